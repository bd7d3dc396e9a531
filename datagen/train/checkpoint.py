"""Atomic training checkpoints.

Layout::

    OUTPUT/checkpoints/step-000010/state.pt     model, optimizer, scheduler, RNG states, step
    OUTPUT/checkpoints/step-000010/meta.json    step, bytes and sha256 of state.pt, config hash
    OUTPUT/checkpoints/latest                   "step-000010"

Commit protocol (the shard store's, for one directory): write into a temporary
directory, fsync the files, rename it to ``step-NNNNNN``, fsync the parent, then rewrite
``latest`` atomically. **Rewriting ``latest`` is the commit.** A crash before it leaves
a temp directory that nobody reads (and the next save sweeps); after it, the checkpoint
is whole.

On load, state.pt's size and sha256 must match meta.json: a truncated or altered file
is refused with its name, never half-loaded. Not covered: two trainers writing one
output directory at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from datagen.errors import DatagenError
from datagen.storage.shards import _fsync_dir, atomic_write_text, sha256_file

LATEST = "latest"


class CheckpointError(DatagenError):
    pass


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save(ckdir: Path, *, step: int, state: dict[str, Any], config_hash: str, keep: int) -> Path:
    import torch

    ckdir.mkdir(parents=True, exist_ok=True)
    for stale in ckdir.glob(".step-*"):  # temp dirs of a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ckdir))
    torch.save(state, tmp / "state.pt")
    _fsync(tmp / "state.pt")
    meta = {"step": step, "bytes": (tmp / "state.pt").stat().st_size, "sha256": sha256_file(tmp / "state.pt"),
            "config_hash": config_hash}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    _fsync(tmp / "meta.json")
    final = ckdir / name
    if final.exists():  # re-saving a step after a resume: same contents by construction
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync_dir(ckdir)
    atomic_write_text(ckdir / LATEST, name)  # <- the commit point
    for old in sorted(p for p in ckdir.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(ckdir: Path) -> Path | None:
    try:
        name = (ckdir / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return ckdir / name


def load(path: Path, *, config_hash: str) -> dict[str, Any]:
    """The checkpoint's state, after checking it is whole and belongs to this config."""
    import torch

    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete or corrupt (meta.json: {exc})") from None
    state_file = path / "state.pt"
    size = state_file.stat().st_size if state_file.exists() else 0
    if size != meta["bytes"]:
        raise CheckpointError(f"checkpoint {state_file} is truncated ({size} bytes, expected {meta['bytes']}); "
                              "refusing to resume from it")
    if sha256_file(state_file) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {state_file} is corrupt (sha256 differs from meta.json); "
                              "refusing to resume from it")
    if meta.get("config_hash") != config_hash:
        raise CheckpointError(f"checkpoint {path} was written by a different train config (data, student, "
                              "loss, optimiser or batch settings changed); start a new output instead")
    return torch.load(state_file, map_location="cpu", weights_only=True)
