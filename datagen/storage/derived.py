"""Stores derived from another (an export, a dedupe view, a re-score): built aside and
renamed into place, so a reader never sees half of one. ``build_store`` starts over after
a failure; ``resumable_build`` keeps what it committed and continues. Local paths only:
not covered on an object store (no rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from datagen.errors import DatagenError, OutputError
from datagen.storage.shards import LOCK_FILE, MANIFEST, ShardStore


@contextmanager
def build_store(dest: Path, job_meta: dict[str, Any], *, shard_rows: int = 50_000) -> Iterator[ShardStore]:
    """A new store for a derived dataset (export, dedupe view): built in a temporary
    directory beside ``dest``, renamed into place only when the block finishes, so a
    failure leaves nothing at ``dest``. Shards still buffered are committed at the end;
    files added with ``attach`` are checksummed in the manifest."""
    from datagen.config import Output

    if dest.exists():
        raise OutputError(f"destination exists: {dest}; choose a new path")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as exc:
        raise OutputError(f"cannot create {dest}: {exc}") from None
    try:
        store = ShardStore.create(tmp / "s", Output(path=tmp / "s", shard_rows=shard_rows), job_meta=job_meta)
        try:
            yield store
            store.commit_all()
            store.manifest.save()
        finally:
            store.close()
        (store.root / LOCK_FILE).unlink(missing_ok=True)
        os.rename(store.root, dest)
    except OSError as exc:
        raise OutputError(f"writing {dest} failed: {exc}; nothing was written there") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def resumable_build(dest: Path, job_meta: dict[str, Any], *, key: str, output: Any) -> Iterator[ShardStore]:
    """A derived store that survives being killed: built in ``.NAME.partial`` beside
    ``dest`` (a store with its own manifest, committing as it goes) and renamed to
    ``dest`` when the block finishes. If the block fails or the process dies, the
    partial store keeps what it committed; the next call with the same
    ``job_meta[key]`` opens it again (the caller skips ``store.row_ids(...)``), one with
    a different ``job_meta[key]`` is refused rather than mixed in. ``store.resumed``
    says which happened."""
    if dest.exists():
        raise OutputError(f"destination exists: {dest}; choose a new path")
    partial = dest.parent / f".{dest.name}.partial"
    out = output.model_copy(update={"path": partial})
    if (partial / MANIFEST).exists():
        store = ShardStore.open(partial, out, for_writing=True)
        if _canonical(store.job_meta().get(key)) != _canonical(job_meta[key]):
            store.close()
            raise OutputError(f"{partial} holds a half-finished {key} with other settings; repeat the "
                              "command that started it to finish it, or delete that directory to start over")
        store.resumed = True
    else:
        shutil.rmtree(partial, ignore_errors=True)  # no manifest: it never committed a row
        store = ShardStore.create(partial, out, job_meta=job_meta)
    try:
        yield store
        store.commit_all()
        store.manifest.save()
    except BaseException:
        try:  # rows already received are complete: keep them for the next call
            store.commit_all()
        except DatagenError:
            pass
        raise
    finally:
        store.close()
    try:
        (partial / LOCK_FILE).unlink(missing_ok=True)
        os.rename(partial, dest)
    except OSError as exc:
        raise OutputError(f"moving {partial} to {dest} failed: {exc}; the rows are in {partial}") from None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
