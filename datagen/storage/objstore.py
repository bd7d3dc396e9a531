"""The shard store on an object store (``output.path: s3://bucket/prefix``).

Same layout and manifest as a local output (see datagen/storage/shards.py), through pyarrow's
``S3FileSystem``, with the commit protocol rebuilt for a store that has no rename:

1. a shard is streamed straight to its final, *unique* name
   ``<stream>/part-NNNNNN-<random>.parquet`` (an S3 object becomes visible only once
   its upload completes, whole: a killed writer leaves nothing or an invisible
   multipart upload, never half an object), hashed (sha256) as the bytes go out;
2. the manifest object is rewritten with the new entry. **That PUT is the commit**: S3
   replaces one object atomically, and readers open only what the manifest lists.

The unique name is what keeps it safe: a data object is never overwritten, so a writer
that lost its lease (below) cannot change a shard another writer already committed.

**What replaces the ``flock``** (S3 has no locks): a lease object ``.datagen.lock``
holding an owner token, host, pid and a renewal time. A writer takes it only when it is
absent, expired (not renewed for ``LEASE_S``), or held by a dead process on this same
host (so a crashed run resumes at once on the machine it ran on); it renews it from a
background thread, and checks the token is still its own before every manifest write.
Limits, stated plainly: plain S3 has no compare-and-swap through pyarrow, so two
writers starting within the same instant can both believe they won; and a writer
paused for longer than ``LEASE_S`` (a stopped VM) can overwrite the manifest once after
another took over — the token check narrows that window to one PUT, it cannot close it.
Do not point two runs at one prefix on purpose.

Credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, profiles, instance roles) and are
never written anywhere. The endpoint (MinIO, moto, R2, …) comes from
``output.storage_options.endpoint_url`` in a job file, else ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``; commands given only a URL (resume, inspect, verify) use the env.

Not covered: streaming dedupe views and ``export`` / ``dedupe`` on an object store
(copy the output to disk first); incomplete multipart uploads left by a killed writer
are invisible but billed until a bucket lifecycle rule aborts them.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import pyarrow.parquet as pq

from datagen import records
from datagen.errors import OutputError
from datagen.storage.shards import (JOB_FILE, LOCK_FILE, MANIFEST, Manifest, ShardStore, StreamWriter, parse_manifest,
                            resume_hint)

SCHEMES = ("s3",)
LEASE_S = 120.0  # a lease not renewed for this long is free to take
RENEW_S = 20.0  # how often the holder renews it


def _endpoint(options: Any) -> str | None:
    url = getattr(options, "endpoint_url", None) if options is not None else None
    return url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(url: str, options: Any = None) -> tuple[Any, str]:
    """(pyarrow FileSystem, "bucket/prefix") for an object-store URL."""
    from pyarrow import fs as pafs

    parsed = urlparse(url)
    if parsed.scheme not in SCHEMES:
        raise OutputError(f"unsupported output URL scheme {parsed.scheme!r} in {url}; "
                          f"supported: {', '.join(s + '://' for s in SCHEMES)}")
    if not parsed.netloc or parsed.query or parsed.fragment or "@" in parsed.netloc:
        raise OutputError(f"output URL must be s3://bucket/prefix, with no credentials or query: {url}")
    base = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    kwargs: dict[str, Any] = {}
    endpoint = _endpoint(options)
    if endpoint:
        ep = urlparse(endpoint)
        kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
    region = getattr(options, "region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs), base


def _io_error(exc: Exception, what: str) -> OutputError:
    # One line, no traceback; pyarrow's AWS messages never carry the secret key.
    return OutputError(f"object store error while {what}: {' '.join(str(exc).split())[:300]}")


class _HashingSink:
    """A write-only file for ParquetWriter that hashes and counts the bytes it uploads."""

    def __init__(self, stream: Any, url: str):
        self._stream = stream
        self.url = url
        self.sha = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        self._stream.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def __str__(self) -> str:  # named in error messages
        return self.url

    def flush(self) -> None:
        pass  # an S3 stream uploads parts on its own schedule; close() completes it

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._stream.close()


class ObjectManifest(Manifest):
    def __init__(self, store: ObjectShardStore, data: dict[str, Any]):
        super().__init__(store.root, data)  # type: ignore[arg-type]
        self.store = store
        self.filesystem = store.fs

    @classmethod
    def fetch(cls, store: ObjectShardStore) -> ObjectManifest:
        text = store.read_text(MANIFEST)
        if text is None:
            raise OutputError(f"{store.root} is not a datagen output (no {MANIFEST})")
        return cls(store, parse_manifest(text, where=f"{store.root}/{MANIFEST}"))

    def save(self) -> None:
        self.store.lease_check()  # never commit after losing the lease
        self.store.put_text(MANIFEST, json.dumps(self.data, indent=1, sort_keys=True))

    def files(self, stream: str) -> list[str]:
        names = [s["file"] for s in self.shards if s["stream"] == stream]
        for name in names:
            if self.store.size_of(name) is None:
                raise OutputError(f"{self.root}/{name} is listed in the manifest but missing; "
                                  f"`datagen verify {self.root}` checks every shard")
        return [self.store.key(n) for n in names]


class ObjectStreamWriter(StreamWriter):
    """Streams a shard straight to its unique final name; the manifest PUT commits it."""

    store: ObjectShardStore

    def _bytes(self) -> int:
        return self._tmp.size if self._tmp is not None else 0

    def _open_sink(self) -> Any:
        seq = self.store.manifest.next_seq(self.stream)
        self._name = f"{self.stream}/part-{seq:06d}-{uuid.uuid4().hex[:12]}.parquet"
        self._tmp = _HashingSink(self.store.fs.open_output_stream(self.store.key(self._name)),
                                 f"{self.store.root}/{self._name}")
        return self._tmp

    def _seal(self, seq: int) -> tuple[str, int, str]:
        try:
            self._writer.close()  # writes the footer and completes the upload
            self._tmp.close()
        except OSError as exc:
            self._broken = str(exc)
            raise _io_error(exc, f"uploading {self.store.root}/{self._name}") from None
        return self._name, self._tmp.size, self._tmp.sha.hexdigest()

    def _discard_sink(self) -> None:
        if self._tmp is not None:
            try:
                self._tmp.close()
                self.store.fs.delete_file(self.store.key(self._name))
            except OSError:
                pass  # an orphan no reader trusts; the next resume sweeps it


class ObjectShardStore(ShardStore):
    writer_class = ObjectStreamWriter

    def __init__(self, url: str, output: Any, fs: Any, base: str):
        self.root, self.fs, self.base = url.rstrip("/"), fs, base
        self._token = uuid.uuid4().hex
        self._held = False
        self._lost: str | None = None
        self._stop_renew = threading.Event()
        self._renewer: threading.Thread | None = None
        super().__init__(url.rstrip("/"), ObjectManifest(self, {"shards": []}), output)  # type: ignore[arg-type]

    # -- object access -----------------------------------------------------------
    def key(self, rel: str) -> str:
        return f"{self.base}/{rel}"

    def read_text(self, rel: str) -> str | None:
        from pyarrow import fs as pafs

        try:
            if self.fs.get_file_info(self.key(rel)).type != pafs.FileType.File:
                return None
            with self.fs.open_input_stream(self.key(rel)) as f:
                return f.read().decode()
        except OSError as exc:
            raise _io_error(exc, f"reading {self.root}/{rel}") from None

    def put_text(self, rel: str, text: str) -> None:
        try:
            with self.fs.open_output_stream(self.key(rel)) as f:
                f.write(text.encode())
        except OSError as exc:
            raise _io_error(exc, f"writing {self.root}/{rel}") from None

    def size_of(self, rel: str) -> int | None:
        from pyarrow import fs as pafs

        info = self.fs.get_file_info(self.key(rel))
        return info.size if info.type == pafs.FileType.File else None

    def sha256_of(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.key(rel)) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.key(rel), filesystem=self.fs)

    def listing(self, stream: str) -> list[str]:
        from pyarrow import fs as pafs

        sel = pafs.FileSelector(self.key(stream), recursive=True, allow_not_found=True)
        infos = self.fs.get_file_info(sel)
        return sorted(i.path[len(self.base) + 1:] for i in infos if i.type == pafs.FileType.File)

    # -- lifecycle -----------------------------------------------------------------
    @classmethod
    def _connect(cls, url: str, output: Any) -> ObjectShardStore:
        fs, base = filesystem(url, getattr(output, "storage_options", None))
        return cls(url, output, fs, base)

    @classmethod
    def create(cls, root: Any, output: Any, *, job_meta: dict[str, Any]) -> ObjectShardStore:
        store = cls._connect(str(root), output)
        if (job_meta.get("job") or {}).get("dedupe", {}).get("streaming"):
            raise OutputError("dedupe.streaming writes its view beside a local output; with an "
                              f"object-store output ({root}) run `datagen dedupe` on a local copy instead")
        try:
            if store.read_text(MANIFEST) is not None:
                raise OutputError(f"{root} already holds a datagen run; {resume_hint(root, job_meta)}, "
                                  "or choose another output.path")
            sel_info = store.fs.get_file_info(_selector(store.base))
            if any(i.path != store.key(LOCK_FILE) for i in sel_info):
                raise OutputError(f"output prefix is not empty: {root}; choose an empty or new one")
            store._acquire()
            store.manifest = ObjectManifest(store, {
                "format": "datagen-shards", "schema_version": records.SCHEMA_VERSION,
                "job": job_meta["name"], "run_fingerprint": job_meta["run_fingerprint"], "shards": [],
            })
            store.put_text(JOB_FILE, json.dumps(job_meta, indent=1, sort_keys=True))
            store.manifest.save()
        except OSError as exc:
            store.close()
            raise _io_error(exc, f"creating {root}") from None
        except OutputError:
            store.close()
            raise
        return store

    @classmethod
    def open(cls, root: Any, output: Any = None, *, for_writing: bool = False) -> ObjectShardStore:
        store = cls._connect(str(root), output)
        store.manifest = ObjectManifest.fetch(store)
        if for_writing:
            store._acquire()
            store.manifest = ObjectManifest.fetch(store)  # re-read under the lease
            store.sweep()
        return store

    def job_meta(self) -> dict[str, Any]:
        text = self.read_text(JOB_FILE)
        try:
            return json.loads(text or "")
        except json.JSONDecodeError:
            raise OutputError(f"{self.root}/{JOB_FILE} is missing or corrupt; "
                              "this output cannot be resumed") from None

    def write_job_meta(self, meta: dict[str, Any]) -> None:
        self.put_text(JOB_FILE, json.dumps(meta, indent=1, sort_keys=True))  # one PUT: atomic

    def sweep(self) -> list[str]:
        committed = {s["file"] for s in self.manifest.shards}
        removed = []
        for stream in records.STREAMS:
            for rel in self.listing(stream):
                if rel not in committed and rel.endswith(".parquet"):
                    self.fs.delete_file(self.key(rel))
                    removed.append(rel)
        return removed

    def attach(self, name: str, text: str | None = None) -> None:
        if text is None:
            raise OutputError("attaching a file written elsewhere is not supported on an object store")
        self.put_text(name, text)
        self.manifest.data.setdefault("files", {})[name] = hashlib.sha256(text.encode()).hexdigest()

    def close(self) -> None:
        self._stop_renew.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
            self._renewer = None
        if self._held:
            self._held = False
            try:
                current = self._read_lease()
                if current and current.get("token") == self._token:
                    self.fs.delete_file(self.key(LOCK_FILE))
            except OSError:
                pass  # an expired lease frees itself

    # -- the lease (what replaces flock) --------------------------------------------
    def _read_lease(self) -> dict[str, Any] | None:
        text = self.read_text(LOCK_FILE)
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            return None  # a torn or foreign object is no lease

    def _lease_body(self) -> str:
        return json.dumps({"token": self._token, "host": socket.gethostname(), "pid": os.getpid(),
                           "renewed_at": time.time()})

    def _acquire(self) -> None:
        current = self._read_lease()
        if current and not _expired(current):
            age = time.time() - float(current.get("renewed_at", 0))
            raise OutputError(
                f"another datagen process is writing {self.root} (host {current.get('host')}, pid "
                f"{current.get('pid')}, lease renewed {age:.0f} s ago); if it is dead, its lease "
                f"expires {LEASE_S:g} s after its last renewal"
            )
        self.put_text(LOCK_FILE, self._lease_body())
        confirmed = self._read_lease()
        if not confirmed or confirmed.get("token") != self._token:
            raise OutputError(f"another datagen process took the write lease on {self.root} at the same time")
        self._held = True
        self._stop_renew.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name="datagen-lease", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        while not self._stop_renew.wait(RENEW_S):
            try:
                current = self._read_lease()
                if not current or current.get("token") != self._token:
                    self._lost = "the lease object was replaced or deleted"
                    return
                self.put_text(LOCK_FILE, self._lease_body())
            except OutputError:
                continue  # a transient store error: try again; the commit path checks too

    def lease_check(self) -> None:
        if not self._held:
            raise OutputError(f"{self.root} was opened for reading; it cannot commit")
        current = self._read_lease() if self._lost is None else None
        if self._lost or not current or current.get("token") != self._token:
            raise OutputError(f"lost the write lease on {self.root} ({self._lost or 'another writer holds it'}); "
                              "stopped before committing, so nothing committed is overwritten")


def _selector(base: str) -> Any:
    from pyarrow import fs as pafs

    return pafs.FileSelector(base, recursive=True, allow_not_found=True)


def _expired(lease: dict[str, Any]) -> bool:
    try:
        renewed = float(lease.get("renewed_at", 0))
    except (TypeError, ValueError):
        return True
    if time.time() - renewed > LEASE_S:
        return True
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        try:
            os.kill(lease["pid"], 0)
        except ProcessLookupError:
            return True  # its process is gone: a crashed run on this machine
        except PermissionError:
            return False
    return False
