"""License registry: which terms bind a row, and whether a set of rows may be mixed.

The registry is data (``datagen/licenses.yaml``), extended per job by the job file's
``licenses:`` list. Every row carries three license ids (teacher, seed data, template);
its *class* is the strictest of the three::

    permissive < conditional < restricted

Two rules decide whether rows may be exported together (``conflicts``):

* two different terms that each claim models trained on their outputs
  (``governs_derivatives``) cannot both be honoured by one student model
  (e.g. Gemma's "Model Derivative" terms and Llama 3.1's naming and licence pass-on);
* share-alike terms (CC BY-SA) cannot be combined with terms that govern derivatives
  or with restricted terms, since the student would owe both.

Not covered: jurisdiction, contracts signed outside these public terms, and whether a
term is enforceable. The registry summarises; it is not legal advice.
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache
from importlib import resources
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field

CLASSES = ("permissive", "conditional", "restricted")
Class = Literal["permissive", "conditional", "restricted"]


class Terms(BaseModel):
    """One entry of the registry. ``class`` is a Python keyword, hence the alias."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str = Field(pattern=r"^(LicenseRef-[A-Za-z0-9.\-]+|[A-Za-z0-9.\-+]+)$")
    name: str
    license_class: Class = Field(alias="class")
    outputs_train_other_models: Literal["yes", "conditional", "no"]
    commercial: Literal["yes", "limited", "no"] = "yes"
    governs_derivatives: bool = False
    share_alike: bool = False
    notice: str | None = None
    aup: str | None = None
    url: str | None = None
    hf_license: str | None = None
    checked: str | None = None
    summary: str = ""

    @property
    def rank(self) -> int:
        return CLASSES.index(self.license_class)


class _Family(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    models: list[str] = Field(default_factory=list)
    hosts: list[str] = Field(default_factory=list)
    license: str


@lru_cache(maxsize=1)
def _builtin() -> tuple[dict[str, Terms], tuple[_Family, ...]]:
    data = yaml.safe_load(resources.files("datagen").joinpath("licenses.yaml").read_text())
    terms = {k: Terms.model_validate({"id": k, **v}) for k, v in data["licenses"].items()}
    families = tuple(_Family.model_validate(f) for f in data["teachers"])
    for f in families:
        assert f.license in terms, f"licenses.yaml: teacher family names unknown license {f.license}"
    return terms, families


def binding(license: dict[str, str | None] | None) -> dict[str, str | None]:
    """The terms that bind a row: its ``license`` struct without the optional
    ``logprobs`` entry when that is unset (only re-scored rows have one). A ``None``
    elsewhere means unknown terms, and stays, so callers treat it as such."""
    return {k: v for k, v in (license or {}).items() if not (k == "logprobs" and v is None)}


class Registry:
    def __init__(self, extra: list[Terms] | tuple[Terms, ...] = ()):
        builtin, self.families = _builtin()
        self.terms = dict(builtin)
        for t in extra:  # a job's declarations win over the built-in summary
            self.terms[t.id] = t

    @classmethod
    def for_job(cls, job_dict: dict[str, Any]) -> Registry:
        return cls([Terms.model_validate(t) for t in job_dict.get("licenses") or []])

    def get(self, license_id: str | None) -> Terms | None:
        return self.terms.get(license_id) if license_id else None

    def teacher_license(self, *, model: str, license: str | None, base_url: str | None = None) -> str | None:
        """The terms binding a teacher: its declared ``license``, else its family's."""
        if license:
            return license
        host = urlparse(base_url).hostname if base_url else None
        for fam in self.families:
            if host and host in fam.hosts:
                return fam.license
            if any(fnmatch.fnmatch(model.lower(), p.lower()) for p in fam.models):
                return fam.license
        return None

    def row_class(self, license: dict[str, str | None]) -> str:
        """The strictest class among a row's licenses; an unknown id counts as restricted."""
        worst = 0
        for lid in binding(license).values():
            t = self.get(lid)
            worst = max(worst, t.rank if t else len(CLASSES) - 1)
        return CLASSES[worst]

    def conflicts(self, ids: set[str]) -> list[str]:
        terms = sorted((self.terms[i] for i in ids if i in self.terms), key=lambda t: t.id)
        out = []
        claiming = [t for t in terms if t.governs_derivatives]
        if len(claiming) > 1:
            out.append(" and ".join(t.id for t in claiming) + " each claim models trained on their "
                       "outputs; one student cannot carry both sets of terms")
        for sa in (t for t in terms if t.share_alike):
            clash = [t.id for t in terms if t.id != sa.id and (t.governs_derivatives or t.license_class == "restricted")]
            if clash:
                out.append(f"{sa.id} requires adaptations under the same license, which "
                           f"{', '.join(clash)} do not allow")
        return out


def resolve_job(job: Any, *, template: Any = None) -> dict[str, str]:
    """Each teacher's license id, checked against the registry; raises a ConfigError that
    names the teacher (or template/seed file) whose terms are unknown."""
    from datagen.errors import ConfigError

    registry = Registry(list(job.licenses))
    hint = ("declare its terms under `licenses:` in the job file "
            "(id, name, class, outputs_train_other_models); `datagen licenses` lists known ids")
    out = {}
    for i, t in enumerate(job.teachers):
        lid = registry.teacher_license(model=t.model, license=t.license, base_url=getattr(t, "base_url", None))
        if lid is None:
            raise ConfigError(f"teachers[{i}] ({t.name}): no license terms known for model {t.model!r}; "
                              f"set `license:` to a known id, or {hint}")
        if registry.get(lid) is None:
            raise ConfigError(f"teachers[{i}].license: {lid!r} is not in the license registry; {hint}")
        out[t.name] = lid
    if template is not None:
        for what, lid in (("template", template.spec.license), ("seed data", template.spec.seeds.license)):
            if registry.get(lid) is None:
                raise ConfigError(f"{template.path}: the {what} license {lid!r} is not in the license "
                                  f"registry; {hint}")
    return out
