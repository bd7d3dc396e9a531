"""The shard store: Parquet shards plus a manifest, with an atomic commit protocol.

Layout of an output directory::

    OUT/datagen-job.json          the resolved job (no secrets: keys are env-var *names*)
    OUT/manifest.json             the commit log: every committed shard, nothing else
    OUT/accepted/part-000000.parquet
    OUT/rejected/part-000000.parquet
    OUT/failed/part-000000.parquet

Commit protocol for one shard (only the driver writes, so there is one committer):

1. rows are streamed into ``<stream>/.part-NNNNNN.parquet.tmp`` in row groups;
2. the writer is closed, the file fsynced, its sha256 computed;
3. it is renamed to ``part-NNNNNN.parquet`` and the directory fsynced;
4. the manifest is rewritten with the new entry (temp file, fsync, rename, fsync dir).

Step 4 is the commit. A crash before it leaves a temp file or an orphan shard that no
reader trusts (readers open only what the manifest lists) and that ``sweep()`` deletes
on resume; the rows in it are regenerated. A crash after it loses nothing.

Object stores have no rename: ``datagen/storage/objstore.py`` subclasses the store and its
writer (unique object names, the manifest PUT is the commit, a lease object instead of
``flock``). Not covered: two drivers writing one directory at once (refused by a lock
file, but only on filesystems where ``flock`` works); silent bit-rot after the commit
(``verify`` catches it via the sha256, the reader does not re-hash on every open).

Long: the writer, the manifest and the store are one commit protocol whose invariants
are read together; derived stores are in ``derived.py``, object stores in ``objstore.py``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from datagen import records
from datagen.errors import OutputError

MANIFEST = "manifest.json"
JOB_FILE = "datagen-job.json"
LOCK_FILE = ".datagen.lock"
FORMAT = "datagen-shards"


def is_url(root: Any) -> bool:
    """``s3://bucket/prefix`` and the like: an object store, not a local path."""
    return isinstance(root, str) and "://" in root


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resume_hint(root: Any, job_meta: dict[str, Any]) -> str:
    """How to go on with the run already at ``root``, with this job file's teacher settings
    if it has one (``resume --job`` refuses, naming the field, what it may not change)."""
    job_file = job_meta.get("job_file")
    if job_file:
        return (f"`datagen resume {root}` continues it (`datagen resume {root} --job {job_file}` with this "
                "file's teacher settings, runtime, target and budget)")
    return f"`datagen resume {root}` continues it"


def _disk_error(exc: OSError, what: str) -> OutputError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "No space left" in str(exc):
        return OutputError(
            f"out of disk space ({os.strerror(exc.errno or errno.ENOSPC)}) while {what}; every "
            "committed shard is intact: free space, then `datagen resume` finishes the job"
        )
    return OutputError(f"cannot write output while {what}: {exc}")


class Manifest:
    """The list of committed shards. Readers trust it, not the directory listing."""

    filesystem: Any = None  # a pyarrow FileSystem for object stores; None reads local paths

    def __init__(self, root: Path, data: dict[str, Any]):
        self.root = root
        self.data = data

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    @classmethod
    def load(cls, root: Path) -> Manifest:
        path = root / MANIFEST
        if not root.exists():
            raise OutputError(f"output directory not found: {root}")
        if not root.is_dir():
            raise OutputError(f"not a directory: {root}")
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise OutputError(f"{root} is not a datagen output (no {MANIFEST})") from None
        return cls(root, parse_manifest(text, where=str(path)))

    def save(self) -> None:
        atomic_write_text(self.root / MANIFEST, json.dumps(self.data, indent=1, sort_keys=True))

    def next_seq(self, stream: str) -> int:
        seqs = [s["seq"] for s in self.shards if s["stream"] == stream]
        return max(seqs) + 1 if seqs else 0

    def counts(self) -> dict[str, int]:
        c = Counter()
        for s in self.shards:
            c[s["stream"]] += s["rows"]
        return {stream: c.get(stream, 0) for stream in records.STREAMS}

    def reasons(self, stream: str) -> Counter:
        c: Counter = Counter()
        for s in self.shards:
            if s["stream"] == stream:
                c.update(s.get("reasons", {}))
        return c

    def license_totals(self) -> dict[str, dict[str, int]]:
        """The shards' license summaries added up: {teacher|seed|template: {id: rows}}."""
        totals: dict[str, Counter] = {}
        for s in self.shards:
            for key, summary in s.get("license_summary", {}).items():
                totals.setdefault(key, Counter()).update(summary)
        return {k: dict(v) for k, v in totals.items()}

    def files(self, stream: str) -> list[Path]:
        paths = [self.root / s["file"] for s in self.shards if s["stream"] == stream]
        for p in paths:
            if not p.is_file():
                raise OutputError(f"{p} is listed in the manifest but missing; "
                                  f"`datagen verify {self.root}` checks every shard")
        return paths


def parse_manifest(text: str, *, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OutputError(f"{where} is corrupt ({exc.msg}); it is only ever replaced atomically, "
                          "so something outside datagen wrote to it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("shards"), list):
        raise OutputError(f"{where} is not a datagen manifest")
    try:
        records.check_schema_version(data.get("schema_version"), where=where)
    except ValueError as exc:
        raise OutputError(str(exc)) from None
    return data


def license_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {"teacher": Counter(), "seed": Counter(), "template": Counter()}
    for row in rows:
        for key, value in (row.get("license") or {}).items():
            if key == "logprobs":  # only re-scored rows name a separate log-prob teacher
                if value:
                    out.setdefault(key, Counter())[value] += 1
                continue
            out[key][value or "unknown"] += 1
    return {k: dict(v) for k, v in out.items()}


def _summaries(table: pa.Table, stream: str) -> list[dict[str, Any]]:
    """What a shard's manifest entry needs of each row (``StreamWriter._shard_rows``)."""
    cols = ["row_id", "license"] + {"failed": ["error"], "rejected": ["verdicts"]}.get(stream, [])
    return [{"row_id": r["row_id"], "license": r["license"], "reason": records.reason(r, stream)}
            for r in table.select(cols).to_pylist()]


class StreamWriter:
    """Streams rows of one stream into shards, committing each through the manifest."""

    def __init__(self, store: ShardStore, stream: str):
        self.store = store
        self.stream = stream
        self._pending: list[dict[str, Any]] = []  # rows not yet in a row group
        self._shard_rows: list[dict[str, Any]] = []  # summaries of rows in the open shard
        self._writer: pq.ParquetWriter | None = None
        self._tmp: Path | None = None
        self._opened_at = time.monotonic()
        self._broken: str | None = None  # set by a failed write: never commit after that

    @property
    def dir(self) -> Path:
        return self.store.root / self.stream

    @property
    def open_rows(self) -> int:
        return len(self._pending) + len(self._shard_rows)

    def add(self, row: dict[str, Any]) -> str | None:
        """Queue ``row``; returns the reason its manifest entry records (``records.reason``)."""
        self._check()
        if not self._shard_rows:
            self._opened_at = time.monotonic()  # the commit timer runs from a shard's first row
        self._pending.append(row)
        reason = records.reason(row, self.stream)
        self._shard_rows.append({"row_id": row["row_id"], "license": row.get("license"), "reason": reason})
        cfg = self.store.output
        if len(self._pending) >= cfg.row_group_rows:
            self._flush_row_group()
        if len(self._shard_rows) >= cfg.shard_rows or self._bytes() >= cfg.shard_bytes:
            self.commit()
        return reason

    def add_table(self, table: pa.Table) -> None:
        """Rows already in the record schema (a derived store copying committed rows):
        written from Arrow, no dict per row; the same rollover and commits as ``add``."""
        self._check()
        cfg = self.store.output
        start = 0
        while start < table.num_rows:
            if not self._shard_rows:
                self._opened_at = time.monotonic()
            part = table.slice(start, cfg.shard_rows - len(self._shard_rows))
            start += part.num_rows
            self._flush_row_group()  # rows added one by one before this table go first
            self._write(part, row_group_rows=cfg.row_group_rows)
            self._shard_rows += _summaries(part, self.stream)
            if len(self._shard_rows) >= cfg.shard_rows or self._bytes() >= cfg.shard_bytes:
                self.commit()

    def due(self) -> bool:
        return self.open_rows > 0 and time.monotonic() - self._opened_at >= self.store.output.commit_every_s

    # -- where the bytes go: a local temp file renamed into place (an object store's
    # writer, in datagen/storage/objstore.py, overrides these three) -------------------------
    def _bytes(self) -> int:
        return self._tmp.stat().st_size if self._tmp is not None and self._tmp.exists() else 0

    def _open_sink(self) -> Any:
        self.dir.mkdir(parents=True, exist_ok=True)
        seq = self.store.manifest.next_seq(self.stream)
        self._tmp = self.dir / f".part-{seq:06d}.parquet.tmp"
        return self._tmp

    def _seal(self, seq: int) -> tuple[str, int, str]:
        """Close the open shard and make it durable under its final name: (file, bytes, sha256)."""
        final = self.dir / f"part-{seq:06d}.parquet"
        try:
            self._writer.close()
            with open(self._tmp, "rb+") as f:
                os.fsync(f.fileno())
            digest = sha256_file(self._tmp)
            size = self._tmp.stat().st_size
            os.replace(self._tmp, final)
            _fsync_dir(self.dir)
        except OSError as exc:
            self._broken = str(exc)
            raise _disk_error(exc, f"committing {final}") from None
        return str(final.relative_to(self.store.root)), size, digest

    def _discard_sink(self) -> None:
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)

    def _check(self) -> None:
        if self._broken:
            raise OutputError(f"the {self.stream} writer stopped after an error ({self._broken}); "
                              f"committed shards are intact, `datagen resume {self.store.root}` continues")

    def _flush_row_group(self) -> None:
        if not self._pending:
            return
        # Take the rows first: whatever happens below, they are never written twice.
        pending, self._pending = self._pending, []
        self._write(records.to_table(pending), row_group_rows=len(pending))

    def _write(self, table: pa.Table, *, row_group_rows: int) -> None:
        try:
            if self._writer is None:
                self._writer = pq.ParquetWriter(
                    self._open_sink(), records.SCHEMA, compression=self.store.output.compression,
                )
            self._writer.write_table(table, row_group_size=row_group_rows)
        except OSError as exc:
            self._broken = str(exc)
            raise _disk_error(exc, f"writing {self._tmp}") from None

    def commit(self) -> dict[str, Any] | None:
        """Seal the open shard and record it in the manifest. No-op when empty."""
        if not self._shard_rows:
            return None
        self._check()
        self._flush_row_group()
        assert self._writer is not None and self._tmp is not None
        seq = self.store.manifest.next_seq(self.stream)
        file, size, digest = self._seal(seq)
        reasons = Counter(r["reason"] for r in self._shard_rows if r["reason"])
        entry = {
            "stream": self.stream,
            "seq": seq,
            "file": file,
            "rows": len(self._shard_rows),
            "bytes": size,
            "sha256": digest,
            "schema_version": records.SCHEMA_VERSION,
            "license_summary": license_summary(self._shard_rows),
            "reasons": dict(reasons),
            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.store.manifest.shards.append(entry)
        try:
            self.store.manifest.save()  # <- the commit point
        except OSError as exc:
            self.store.manifest.shards.pop()
            self._broken = str(exc)
            raise _disk_error(exc, "writing the manifest") from None
        self._writer, self._tmp, self._shard_rows = None, None, []
        self._opened_at = time.monotonic()
        return entry

    def abandon(self) -> None:
        """Drop the open shard without committing (its rows will be regenerated)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:
                pass
        self._discard_sink()
        self._writer, self._tmp, self._pending, self._shard_rows = None, None, [], []


def _local(cls: type, root: Any) -> None:
    if cls is ShardStore and is_url(root):
        raise OutputError(f"{root} is an object store: open it with datagen.storage.open_store "
                          "(or create_store), which pick the store for a place")


class ShardStore:
    """One output directory. ``create`` for a new run, ``open`` to resume or read.

    An object-store URL (``s3://bucket/prefix``) is ``storage.objstore.ObjectShardStore``'s,
    same interface, with the commit protocol for a store that has no rename;
    ``storage.open_store`` / ``create_store`` pick the class for a place."""

    writer_class: type[StreamWriter] = StreamWriter

    def __init__(self, root: Path, manifest: Manifest, output: Any):
        self.root = root
        self.manifest = manifest
        self.output = output
        self._lock_fd: int | None = None
        self.resumed = False  # set by resumable_build when it reopened a partial store
        self.writers = {s: self.writer_class(self, s) for s in records.STREAMS}

    # -- lifecycle -----------------------------------------------------------------
    @classmethod
    def create(cls, root: Path | str, output: Any, *, job_meta: dict[str, Any]) -> ShardStore:
        _local(cls, root)
        if root.exists() and not root.is_dir():
            raise OutputError(f"output path exists and is a file, not a directory: {root}")
        if (root / MANIFEST).exists():
            raise OutputError(f"{root} already holds a datagen run; {resume_hint(root, job_meta)}, "
                              "or choose another --output")
        if root.exists() and any(p.name != LOCK_FILE for p in root.iterdir()):
            raise OutputError(f"output directory is not empty: {root}; choose an empty or new one")
        try:
            root.mkdir(parents=True, exist_ok=True)
            manifest = Manifest(root, {
                "format": FORMAT, "schema_version": records.SCHEMA_VERSION,
                "job": job_meta["name"], "run_fingerprint": job_meta["run_fingerprint"],
                "shards": [],
            })
            store = cls(root, manifest, output)
            store._lock()
            if (root / MANIFEST).exists():  # another `run` won the race for this directory
                store.close()
                raise OutputError(f"{root} already holds a datagen run; choose another --output")
            atomic_write_text(root / JOB_FILE, json.dumps(job_meta, indent=1, sort_keys=True))
            manifest.save()
        except OSError as exc:
            raise _disk_error(exc, f"creating {root}") from None
        return store

    @classmethod
    def open(cls, root: Path | str, output: Any = None, *, for_writing: bool = False) -> ShardStore:
        _local(cls, root)
        manifest = Manifest.load(root)  # also the clear error for a non-output directory
        store = cls(root, manifest, output)
        if for_writing:
            # Lock, then re-read: a writer that committed in between must not have its
            # new shard swept as an orphan.
            store._lock()
            store.manifest = Manifest.load(root)
            store.sweep()
        return store

    def job_meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.root / JOB_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise OutputError(f"{self.root / JOB_FILE} is missing or corrupt ({exc}); "
                              "this output cannot be resumed") from None

    def write_job_meta(self, meta: dict[str, Any]) -> None:
        """Replace the stored job (a resume that changed how teachers run), atomically."""
        try:
            atomic_write_text(self.root / JOB_FILE, json.dumps(meta, indent=1, sort_keys=True))
        except OSError as exc:
            raise _disk_error(exc, f"writing {self.root / JOB_FILE}") from None

    def _lock(self) -> None:
        fd = os.open(self.root / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputError(f"another datagen process is writing {self.root}") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def sweep(self) -> list[Path]:
        """Delete temp files and shards the manifest does not list (uncommitted work)."""
        committed = {self.root / s["file"] for s in self.manifest.shards}
        removed = []
        for stream in records.STREAMS:
            d = self.root / stream
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if p not in committed and (p.name.endswith(".tmp") or p.suffix == ".parquet"):
                    p.unlink()
                    removed.append(p)
        return removed

    # -- writing -------------------------------------------------------------------
    def add(self, stream: str, row: dict[str, Any]) -> str | None:
        """Queue ``row`` in ``stream``; returns its reason (None for an accepted row)."""
        return self.writers[stream].add(row)

    def add_table(self, stream: str, table: pa.Table) -> None:
        self.writers[stream].add_table(table)

    def attach(self, name: str, text: str | None = None) -> None:
        """Record a side file (written already, or now from ``text``) with its checksum."""
        if text is not None:
            atomic_write_text(self.root / name, text)
        self.manifest.data.setdefault("files", {})[name] = sha256_file(self.root / name)

    def commit_due(self) -> None:
        for w in self.writers.values():
            if w.due():
                w.commit()

    def commit_all(self) -> None:
        for w in self.writers.values():
            w.commit()

    # -- reading -------------------------------------------------------------------
    # File-level access by manifest-relative name, for `verify`: local files here, objects
    # in ObjectShardStore.
    def size_of(self, rel: str) -> int | None:
        """Bytes of a stored file, None when it is missing."""
        path = self.root / rel
        return path.stat().st_size if path.is_file() else None

    def sha256_of(self, rel: str) -> str:
        return sha256_file(self.root / rel)

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.root / rel)

    def listing(self, stream: str) -> list[str]:
        """Every file under a stream's folder, committed or not, sorted."""
        d = self.root / stream
        return sorted(str(p.relative_to(self.root)) for p in d.iterdir()) if d.is_dir() else []

    def row_ids(self, streams: Iterable[str] = ("accepted", "rejected")) -> set[str]:
        ids: set[str] = set()
        for stream in streams:
            for path in self.manifest.files(stream):
                ids.update(pq.read_table(path, columns=["row_id"], filesystem=self.manifest.filesystem)
                           .column("row_id").to_pylist())
        return ids

    def unresolved_failures(self) -> int:
        """Failed row ids not since accepted or rejected (a resume retries failed rows,
        and a row failing on several resumes has several failed entries)."""
        if not self.manifest.counts()["failed"]:
            return 0
        return len(self.row_ids(("failed",)) - self.row_ids(("accepted", "rejected")))

    def read(self, stream: str = "accepted", columns: list[str] | None = None) -> pa.Table:
        files = self.manifest.files(stream)
        if not files:
            return records.SCHEMA.empty_table() if columns is None else \
                records.SCHEMA.empty_table().select(columns)
        fs = self.manifest.filesystem
        return pa.concat_tables(pq.read_table(p, columns=columns, filesystem=fs) for p in files)

    def iter_rows(self, stream: str = "accepted", batch_rows: int = 1024) -> Iterator[dict[str, Any]]:
        """Stream rows shard by shard, row group by row group: memory flat in dataset size."""
        for table in self.iter_tables(stream, batch_rows):
            yield from table.to_pylist()

    def iter_tables(self, stream: str = "accepted", batch_rows: int = 1024,
                    columns: list[str] | None = None) -> Iterator[pa.Table]:
        """``iter_rows`` as Arrow tables of up to ``batch_rows`` rows (``columns``: only those)."""
        for path in self.manifest.files(stream):
            pf = pq.ParquetFile(path, filesystem=self.manifest.filesystem)
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield pa.Table.from_batches([batch])
