"""``datagen verify DIR``: check every committed shard against the manifest (DIR may be an
``s3://`` URL: the checks go through the store's own file access).

For each shard listed: the file exists, its size and sha256 match, Parquet can read its
footer, the row count and schema version match, and the license summary recomputed
from its rows equals the manifest's. Files the manifest lists besides shards (an
export's card and NOTICE) are checked by sha256. Shards on disk that the manifest does
not list are reported as uncommitted (not an error: a crash leaves them, resume sweeps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datagen import records
from datagen.storage import open_store
from datagen.storage.shards import license_summary


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shards: int = 0
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(root: Path | str) -> Report:
    """``root``: an output directory or an object-store URL (``s3://bucket/prefix``)."""
    store = open_store(root)
    manifest = store.manifest
    rep = Report()
    listed = set()
    for s in manifest.shards:
        name = s["file"]
        listed.add(name)
        rep.shards += 1
        size = store.size_of(name)
        if size is None:
            rep.problems.append(f"{name}: missing (listed in the manifest)")
            continue
        if size != s["bytes"]:
            rep.problems.append(f"{name}: size {size} bytes, manifest says {s['bytes']} (truncated or rewritten)")
            continue
        digest = store.sha256_of(name)
        if digest != s["sha256"]:
            rep.problems.append(f"{name}: sha256 {digest[:16]}… does not match the manifest's {s['sha256'][:16]}…")
            continue
        try:
            pf = store.parquet_file(name)
            meta = pf.schema_arrow.metadata or {}
            version = meta.get(b"datagen.schema_version", b"").decode() or None
            licenses = pf.read(columns=["license"]).column("license").to_pylist()
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a finding, not a crash
            rep.problems.append(f"{name}: not readable as Parquet ({exc})")
            continue
        if pf.metadata.num_rows != s["rows"]:
            rep.problems.append(f"{name}: {pf.metadata.num_rows} rows, manifest says {s['rows']}")
        if version != s.get("schema_version"):
            rep.problems.append(f"{name}: schema version {version}, manifest says {s.get('schema_version')}")
        else:
            try:
                records.check_schema_version(version, where=name)
            except ValueError as exc:
                rep.problems.append(str(exc))
        if license_summary([{"license": lic} for lic in licenses]) != s.get("license_summary"):
            rep.problems.append(f"{name}: license tags differ from the manifest's license summary")
        rep.rows += s["rows"]
    for rel, digest in (manifest.data.get("files") or {}).items():
        if store.size_of(rel) is None:
            rep.problems.append(f"{rel}: missing (listed in the manifest)")
        elif store.sha256_of(rel) != digest:
            rep.problems.append(f"{rel}: sha256 does not match the manifest")
    for stream in records.STREAMS:
        for rel in store.listing(stream):
            if rel not in listed:
                rep.notes.append(f"{rel}: not in the manifest (uncommitted; readers ignore it, resume deletes it)")
    return rep
