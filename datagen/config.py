"""Job files: the job's pydantic v2 models, and loading one from YAML.

Relative paths in a job file are relative to the job file's folder, so a job runs the
same from any working directory. What is not here: a teacher's fields
(``teachers/spec.py``), a filter's params (``filters/``), the strict base model and
one-line error format (``validation.py``), and which changes a resume accepts
(``run/identity.py``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BeforeValidator, Field, ValidationError, ValidationInfo, ValidatorFunctionWrapHandler,
                      WrapSerializer, field_validator, model_validator)

from datagen.errors import ConfigError
from datagen.filters import DEFAULT_FILTERS, FILTERS, FilterSpec
from datagen.licenses import Terms
from datagen.teachers.spec import (BACKENDS, OpenAITeacher, Price, Sampling, Teacher, TeacherSpec, VLLMEngine,
                                   VLLMTeacher, even_share, teacher_identity)
from datagen.validation import NAME as _NAME
from datagen.validation import Strict, format_validation_error, read_model, read_yaml

# The teacher specs and the file helpers live in their own modules; scripts that took
# them from here still can.
__all__ = ["Job", "load_job", "parse_job", "job_schema", "out_path", "Prompts", "SeedSource", "Axis",
           "PromptDedupe", "EvalSet", "Decontaminate", "Output", "StorageOptions", "Runtime", "Dedupe", "Budget",
           "Strict", "read_model", "read_yaml", "format_validation_error", "Teacher", "TeacherSpec",
           "VLLMTeacher", "OpenAITeacher", "VLLMEngine", "Sampling", "Price", "even_share", "teacher_identity"]

SEED_FORMATS = ("auto", "jsonl", "csv", "parquet", "text", "hf")


class SeedSource(Strict):
    """Where a template's variables come from; declared in the template spec, or in the
    job's ``prompts.seeds`` to fill a library template with your own data."""

    path: Path = Field(description="file, or a `datasets` save_to_disk folder; relative to the file naming it")
    format: Literal["auto", "jsonl", "csv", "parquet", "text", "hf"] = Field(
        "auto", description="auto: by suffix (.jsonl .csv .parquet .txt), a folder is `hf`")
    license: str = Field(min_length=1, description="SPDX id or LicenseRef-… of the seed data")
    id_field: str | None = Field("id", description="column holding a unique seed id; null: the row number")
    columns: dict[str, str] = Field(
        default_factory=dict, description="template variable -> source column (text files: column `text`)")
    max_bad_rows: int = Field(
        0, ge=0, description="skip up to this many bad rows (each reported by row number); 0 refuses the first")


class Axis(Strict):
    """A diversity axis: a template variable whose values are dealt out in fixed shares.

    ``values`` maps each value to its weight (a list means equal weights). With
    ``column``, the value is the seed's own column (e.g. a seed's topic) and the shares
    decide which seeds are drawn; without it, the value is given to the template as the
    variable named like the axis."""

    values: dict[str, float] | list[str] = Field(min_length=1)
    column: str | None = Field(None, description="seed column this axis reads, instead of a free variable")

    @field_validator("values")
    @classmethod
    def _weights(cls, v: dict[str, float] | list[str]) -> dict[str, float] | list[str]:
        if isinstance(v, dict) and any(w <= 0 for w in v.values()):
            raise ValueError("every weight must be > 0")
        if isinstance(v, list) and len(set(v)) != len(v):
            raise ValueError("values repeat")
        return v

    def weights(self) -> dict[str, float]:
        return dict(self.values) if isinstance(self.values, dict) else dict.fromkeys(self.values, 1.0)


class PromptDedupe(Strict):
    """Drop duplicate prompts before any teacher sees them (compares the last user turn)."""

    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Jaccard of word n-gram sets")
    ngram: int = Field(3, ge=1, le=32)
    num_perm: int = Field(128, ge=16, le=1024)


class EvalSet(Strict):
    name: str = Field(pattern=_NAME)
    path: Path
    format: Literal["auto", "jsonl", "csv", "parquet", "text", "hf"] = "auto"
    field: str = Field("text", description="the column holding the eval text (text files: `text`)")


class Decontaminate(Strict):
    """Drop prompts sharing a word n-gram with an eval set (13-grams, as in GPT-3's study)."""

    evals: list[EvalSet] = Field(min_length=1)
    ngram: int = Field(13, ge=3, le=64)


class Prompts(Strict):
    template: Path = Field(description="template spec (YAML), relative to the job file")
    count: int | None = Field(None, ge=1, description="prompts to use; default all the seeds give")
    seeds: SeedSource | None = Field(None, description="replaces the template's own seed source")
    axes: dict[str, Axis] = Field(default_factory=dict, description="diversity axes, by template variable")
    quota_tolerance: float = Field(
        0.01, ge=0.0, le=1.0, description="refuse a plan whose share of any axis value is further off")
    dedupe: PromptDedupe | None = Field(None, description="unset: prompts that render alike are an error")
    decontaminate: Decontaminate | None = None


class StorageOptions(Strict):
    """Where an object-store output lives. Credentials are not settable here on purpose:
    they come from the standard AWS environment (see datagen/storage/objstore.py)."""

    endpoint_url: str | None = Field(None, pattern=r"^https?://[^/@?#\s]+/?$",
                                     description="S3-compatible endpoint (MinIO, R2, ...); default AWS")
    region: str | None = Field(None, pattern=r"^[a-z0-9-]{1,32}$")


# s3://bucket/prefix: an object store (datagen/storage/objstore.py); anything else is a local path.
_S3_URL = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^?#\s@]*)?$"
_BAD_URL = ("must be a local path or s3://bucket/prefix (bucket: 3-63 lower-case letters, digits, "
            "dots, hyphens; no credentials or query)")
ObjectURL = Annotated[str, Field(pattern=_S3_URL)]


class Output(Strict):
    path: Union[ObjectURL, Path] = Field(description="output directory, or s3://bucket/prefix")
    storage_options: StorageOptions | None = None

    @field_validator("path", mode="before")
    @classmethod
    def _url(cls, v: Any) -> Any:
        if isinstance(v, str) and "://" in v and not re.match(_S3_URL, v):
            raise ValueError(_BAD_URL)  # not echoed: a URL may carry credentials (s3://KEY:SECRET@bucket)
        return v
    shard_rows: int = Field(5000, ge=1)
    shard_bytes: int = Field(256 * 2**20, ge=4096, description="roll over at about this many bytes")
    row_group_rows: int = Field(512, ge=1)
    commit_every_s: float = Field(
        60.0, gt=0.0, description="commit a partial shard at least this often"
    )
    compression: Literal["zstd", "snappy", "none"] = "zstd"


class Runtime(Strict):
    inflight_per_actor: int = Field(
        2, ge=1, le=64, description="batches queued on one teacher actor, at least; more when its backend "
        "serves more rows at once (max_concurrency, max_num_seqs): see teachers.fleet.slots. Bounds memory"
    )
    startup_timeout_s: float = Field(
        1800.0, gt=0.0, description="give up when a teacher actor has not started by then"
    )
    max_consecutive_failures: int = Field(
        50, ge=1, description="stop the run when this many rows in a row fail at the teacher"
    )
    ray_address: str | None = Field(None, description="join this cluster; default $RAY_ADDRESS or local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance")
    filter_actors: int = Field(
        1, ge=0, le=256, description="Ray actors running the filters beside generation; 0 runs them in the driver"
    )
    filter_num_cpus: float = Field(0.0, ge=0.0, description="CPUs Ray reserves per filter actor")
    metrics_every_s: float = Field(
        10.0, gt=0.0, description="seconds between two lines of OUT/metrics.jsonl (per-stage figures)"
    )


class Dedupe(Strict):
    """Near-duplicate detection (``datagen dedupe``); see datagen/dedupe/minhash.py."""

    on: Literal["response", "prompt", "both"] = "response"
    threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Jaccard similarity of shingle sets")
    num_perm: int = Field(128, ge=16, le=1024)
    seed: int = 1
    shingle: Literal["word", "char"] = "word"
    ngram: int = Field(3, ge=1, le=32)
    lowercase: bool = True
    strip_punct: bool = True
    fp_weight: float = Field(0.05, ge=0.0, le=1.0)
    fn_weight: float = Field(0.95, ge=0.0, le=1.0)
    verify: Literal["exact", "estimate"] = Field(
        "exact", description="check candidates by exact Jaccard, or by the signature estimate"
    )
    streaming: bool = Field(
        False, description="dedupe during `datagen run` (index on Ray actors); the view lands in OUT/dedupe"
    )
    actors: int = Field(2, ge=1, le=256, description="index actors for streaming mode (bands are split over them)")


FILTER_NAMES = tuple(FILTERS)
# the discriminators of the job's unions, left out of the field paths errors name
UNION_TAGS = frozenset(BACKENDS) | frozenset(FILTERS)


def _filter_entry(value: Any) -> Any:
    """A bare name is the filter with its default params; an unknown name is named as such."""
    if isinstance(value, FilterSpec):
        return value
    name = value if isinstance(value, str) else value.get("name") if isinstance(value, dict) else None
    if name not in FILTERS:
        raise ValueError(f"unknown filter (known: {', '.join(FILTERS)})")
    return {"name": value} if isinstance(value, str) else value


def _dump_filter(spec: FilterSpec, handler: Any) -> Any:
    # Params all left at their defaults dump as the bare name: old job files, and the run
    # fingerprints computed from them, stay the same.
    return spec.name if spec.model_fields_set <= {"name"} else handler(spec)


FilterEntry = Annotated[
    Union[tuple(FILTERS.values())], Field(discriminator="name"),  # type: ignore[valid-type]
    BeforeValidator(_filter_entry), WrapSerializer(_dump_filter),
]


class Budget(Strict):
    """Limits for ``target_accepted``: whichever is reached first stops the run."""

    max_rows: int | None = Field(None, ge=1, description="rows generated in the output, all streams")
    max_tokens: int | None = Field(None, ge=1, description="prompt + completion tokens in the output")


class Job(Strict):
    name: str = Field(pattern=_NAME)
    seed: int = 0
    prompts: Prompts
    teachers: list[Teacher] = Field(min_length=1)
    filters: list[FilterEntry] = Field(
        default_factory=lambda: [FILTERS[n](name=n) for n in DEFAULT_FILTERS],
        description="filters in the order they run: a name, or {name: ..., params}",
    )
    filter_short_circuit: bool = Field(True, description="a row stops at its first drop")
    target_accepted: int | None = Field(
        None, ge=1, description="stop once this many rows are accepted (or a budget is reached)"
    )
    budget: Budget = Field(default_factory=Budget)
    output: Output
    runtime: Runtime = Field(default_factory=Runtime)
    dedupe: Dedupe = Field(default_factory=Dedupe)
    licenses: list[Terms] = Field(
        default_factory=list, description="terms to add to (or override in) the license registry"
    )

    # ``datagen preview`` calls no teacher: validated with the context {TEACHERS_OPTIONAL: True}
    # (``parse_job(need_teachers=False)``), a missing or empty ``teachers`` is []. Without
    # it, and in the JSON schema, ``teachers`` stays required with at least one entry.
    @model_validator(mode="before")
    @classmethod
    def _teachers_default(cls, data: Any, info: ValidationInfo) -> Any:
        if _teachers_optional(info) and isinstance(data, dict) and data.get("teachers") is None:
            return {**data, "teachers": []}
        return data

    @field_validator("teachers", mode="wrap")
    @classmethod
    def _teachers_may_be_empty(cls, v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        return [] if v == [] and _teachers_optional(info) else handler(v)

    @model_validator(mode="after")
    def _unique_teachers(self) -> Job:
        seen: set[str] = set()
        for i, t in enumerate(self.teachers):
            if t.name in seen:
                raise ValueError(f"teachers[{i}].name: {t.name!r} is used by two teachers")
            seen.add(t.name)
        return self


TEACHERS_OPTIONAL = "teachers_optional"  # validation context key: see Job._teachers_default


def _teachers_optional(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get(TEACHERS_OPTIONAL))


def parse_job(data: Any, *, where: str, base_dir: Path, need_teachers: bool = True) -> Job:
    """A validated job with its paths resolved against ``base_dir``. ``need_teachers=False``
    (for verbs that call no teacher) accepts a job with no ``teachers``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: a job file must be a mapping of fields, got {type(data).__name__}")
    try:
        job = Job.model_validate(data, context={TEACHERS_OPTIONAL: not need_teachers})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where=where, tags=UNION_TAGS)) from None
    return _resolve_paths(job, base_dir)


def _resolve_paths(job: Job, base: Path) -> Job:
    def rel(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    def teacher(t: Any) -> Any:
        tpl = getattr(getattr(t, "engine", None), "chat_template", None)
        if tpl is None or "{" in tpl:  # unset, or the template text itself
            return t
        return t.model_copy(update={"engine": t.engine.model_copy(update={"chat_template": str(rel(Path(tpl)))})})

    p = job.prompts
    update: dict[str, Any] = {"template": rel(p.template)}
    if p.seeds is not None:
        update["seeds"] = p.seeds.model_copy(update={"path": rel(p.seeds.path)})
    if p.decontaminate is not None:
        evals = [e.model_copy(update={"path": rel(e.path)}) for e in p.decontaminate.evals]
        update["decontaminate"] = p.decontaminate.model_copy(update={"evals": evals})
    return job.model_copy(
        update={
            "prompts": p.model_copy(update=update),
            "output": job.output.model_copy(update={"path": out_path(job.output.path, base)}),
            "teachers": [teacher(t) for t in job.teachers],
        }
    )


def out_path(p: str | os.PathLike[str], base: Path) -> str | Path:
    """An object-store URL as given; a local path resolved against ``base``."""
    if isinstance(p, str) and "://" in p:
        if not re.match(_S3_URL, p):
            raise ConfigError(f"--output: {_BAD_URL}")
        return p
    p = Path(p)
    return p if p.is_absolute() else (base / p).resolve()


def load_job(path: str | os.PathLike[str], *, output: str | os.PathLike[str] | None = None,
             need_teachers: bool = True) -> Job:
    """Read, validate and resolve a job file. ``output`` overrides ``output.path``;
    ``need_teachers`` as in ``parse_job``."""
    path = Path(path)
    job = parse_job(read_yaml(path, what="job file"), where=str(path), base_dir=path.parent.resolve(),
                    need_teachers=need_teachers)
    if output is not None:
        job = job.model_copy(
            update={"output": job.output.model_copy(update={"path": out_path(output, Path.cwd())})}
        )
    return job


def job_schema() -> dict[str, Any]:
    return Job.model_json_schema()
