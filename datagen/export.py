"""``datagen export``: a self-contained dataset of the accepted rows whose terms allow it.

Selection is by license class (a row's class is the strictest of its teacher, seed and
template terms) or by an explicit allow-list of license ids. Before anything is written,
the licenses of the selected rows are checked against each other
(``Registry.conflicts``); a conflict stops the export with the reason unless the user
overrides it, and the override and its reason are written into the card.

The export is itself a datagen output directory (manifest with sha256 per shard, so
``datagen verify`` and ``datagen inspect`` work on it), plus:

* ``README.md``, a Hugging Face dataset card with YAML front matter (license, tags,
  sizes, teachers, the generation config; no secrets: keys are only ever env-var names),
* ``NOTICE`` when any selected terms carry a notice or attribution duty.

It is built beside the destination and renamed into place at the end
(``storage.derived.build_store``), so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml

from datagen.errors import OutputError
from datagen.licenses import CLASSES, Registry, binding
from datagen.storage import open_store
from datagen.storage.derived import build_store
from datagen.storage.shards import ShardStore


@dataclass
class ExportResult:
    dest: Path
    rows: int
    dropped: Counter = field(default_factory=Counter)  # class or "not allowed" -> rows
    licenses: set[str] = field(default_factory=set)
    conflicts: list[str] = field(default_factory=list)


def _size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "n>10M"


def export(src: Path, dest: Path, *, license_class: str | None = None, allow: list[str] | None = None,
           allow_incompatible: str | None = None, shard_rows: int = 50_000) -> ExportResult:
    if license_class is not None and allow:
        raise OutputError("choose either --license-class or --allow, not both")
    if license_class is None and not allow:
        license_class = "permissive"
    if dest.exists():
        raise OutputError(f"export destination exists: {dest}; choose a new path")
    store = open_store(src)
    meta = store.job_meta()
    registry = Registry.for_job(meta.get("job") or {})

    def allowed(lic: dict[str, str]) -> tuple[bool, str]:
        if allow:
            bad = sorted({str(v) for v in binding(lic).values() if v not in allow})
            return (not bad, "not allowed: " + ",".join(bad))
        cls = registry.row_class(lic)
        return (CLASSES.index(cls) <= CLASSES.index(license_class), cls)

    # Pass 1, licenses only: what would be exported, and may it be mixed?
    res = ExportResult(dest=dest, rows=0)
    for path in store.manifest.files("accepted"):
        for lic in pq.read_table(path, columns=["license"]).column("license").to_pylist():
            ok, why = allowed(lic)
            if ok:
                res.rows += 1
                res.licenses.update(v for v in lic.values() if v)
            else:
                res.dropped[why] += 1
    res.conflicts = registry.conflicts(res.licenses)
    if res.conflicts and not allow_incompatible:
        raise OutputError("refusing to mix incompatible terms: " + "; ".join(res.conflicts)
                          + ". Narrow the selection, or pass --allow-incompatible REASON to override "
                          "(the reason is written into the dataset card)")

    # Pass 2: stream the selected rows into a new store, beside the destination.
    out_meta = {
        "name": meta["name"], "run_fingerprint": meta["run_fingerprint"],
        "job": meta.get("job"), "job_file": None,
        "export": {"source": str(src), "license_class": license_class, "allow": allow,
                   "override": allow_incompatible, "conflicts": res.conflicts},
    }
    with build_store(dest, out_meta, shard_rows=shard_rows) as out:
        for row in store.iter_rows("accepted"):
            if allowed(row["license"])[0]:
                out.add("accepted", row)
        out.commit_all()
        out.attach("README.md", _card(out, meta, registry, res, license_class, allow, allow_incompatible))
        notice = _notice(registry, res.licenses, meta)
        if notice:
            out.attach("NOTICE", notice)
    return res


def _teachers(meta: dict[str, Any], registry: Registry) -> list[dict[str, Any]]:
    out = []
    for t in (meta.get("job") or {}).get("teachers", []):
        lid = registry.teacher_license(model=t["model"], license=t.get("license"), base_url=t.get("base_url"))
        out.append({"name": t["name"], "backend": t["backend"], "model": t["model"], "license": lid})
    return out


def _card(out: ShardStore, meta: dict[str, Any], registry: Registry, res: ExportResult,
          license_class: str | None, allow: list[str] | None, override: str | None) -> str:
    ids = sorted(res.licenses)
    terms = [registry.get(i) for i in ids]
    hf = {t.hf_license for t in terms if t}
    teachers = _teachers(meta, registry)
    front: dict[str, Any] = {}
    if len(hf) == 1 and None not in hf and "other" not in hf:
        front["license"] = hf.pop()
    else:
        front["license"] = "other"
        front["license_name"] = "mixed: " + ", ".join(ids) if ids else "none"
        front["license_link"] = "README.md"  # the table below: every term, its class and duties
    front.update({
        "pretty_name": f"{meta['name']} (datagen export)",
        "tags": ["datagen", "distillation", "synthetic"],
        "size_categories": [_size_category(res.rows)],
        "task_categories": ["text-generation"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "accepted/*.parquet"}]}],
        "datagen": {
            "rows": res.rows,
            "schema_version": out.manifest.data["schema_version"],
            "selection": {"license_class": license_class} if license_class else {"allow": allow},
            "licenses": out.manifest.license_totals(),
            "teachers": [t for t in teachers if t["license"] in res.licenses] or teachers,
            "source_run_fingerprint": meta["run_fingerprint"],
            "override": {"reason": override, "conflicts": res.conflicts} if res.conflicts else None,
        },
    })
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {meta['name']}", "",
             f"{res.rows} rows distilled with datagen from the teachers listed in the front matter. "
             "Each row holds the prompt (chat turns), the teacher's answer, its top-k token "
             "log-probabilities where the teacher gave them, provenance and the license tags "
             "that bind it.", "",
             "## Licenses and obligations", "",
             "| terms | class | outputs may train other models | commercial | in short | duties | link |",
             "|---|---|---|---|---|---|---|"]
    for lid, t in zip(ids, terms):
        if t is None:
            lines.append(f"| {lid} | unknown | ? | ? | not in the registry | ? | |")
            continue
        duties = "; ".join(d for d in (
            "models trained on it carry these terms" if t.governs_derivatives else "",
            "share-alike" if t.share_alike else "",
            t.notice or "", f"acceptable-use policy: {t.aup}" if t.aup else "") if d) or "none"
        summary = " ".join(t.summary.split())
        lines.append(f"| {t.name} (`{lid}`) | {t.license_class} | {t.outputs_train_other_models} | "
                     f"{t.commercial} | {summary} | {duties} | {t.url or ''} (checked {t.checked}) |")
    lines += ["", "Summaries from datagen's license registry, not legal advice: read the linked terms."]
    if res.conflicts:
        lines += ["", "## License override", "",
                  "These rows mix terms that datagen considers incompatible:", ""]
        lines += [f"- {c}" for c in res.conflicts]
        lines += ["", f"The export was forced with this reason: **{override}**"]
    if res.dropped:
        lines += ["", "## Rows left out", ""]
        lines += [f"- {why}: {n}" for why, n in sorted(res.dropped.items())]
    job = dict(meta.get("job") or {})
    job.pop("output", None)  # a local path of the machine that ran it
    lines += ["", "## Generation config", "",
              "The job that produced these rows (API keys appear only as environment-variable names):",
              "", "```yaml", yaml.safe_dump(job, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _notice(registry: Registry, ids: set[str], meta: dict[str, Any]) -> str | None:
    lines = []
    for lid in sorted(ids):
        t = registry.get(lid)
        if t and t.notice:
            lines.append(f"{t.name} ({lid}): {t.notice}")
            if t.url:
                lines.append(f"  Terms: {t.url}")
    if not lines:
        return None
    return "\n".join([f"NOTICE for the dataset '{meta['name']}'", "", *lines, ""])


def export_summary(res: ExportResult) -> str:
    dropped = ", ".join(f"{why} {n}" for why, n in sorted(res.dropped.items())) or "none"
    return json.dumps({"dest": str(res.dest), "rows": res.rows, "left_out": dropped,
                       "licenses": sorted(res.licenses)})
