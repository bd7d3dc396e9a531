"""Where rows are kept: the shard store and its manifest (``shards.py``), the same store on
an object store (``objstore.py``), re-hashing a store against its manifest (``verify.py``).

``open_store`` / ``create_store`` pick the store for a place: a local path or ``s3://``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datagen.storage.objstore import ObjectShardStore
from datagen.storage.shards import ShardStore, is_url


def open_store(root: Path | str, output: Any = None, *, for_writing: bool = False) -> ShardStore:
    """The store at ``root`` (its manifest must exist): to read, or to resume writing."""
    if is_url(root):
        return ObjectShardStore.open(root, output, for_writing=for_writing)
    return ShardStore.open(Path(root), output, for_writing=for_writing)


def create_store(root: Path | str, output: Any, *, job_meta: dict[str, Any]) -> ShardStore:
    """A new, empty store at ``root`` (refused if one is there)."""
    if is_url(root):
        return ObjectShardStore.create(root, output, job_meta=job_meta)
    return ShardStore.create(Path(root), output, job_meta=job_meta)
