"""A run's provider batches, durable in ``OUT/batches/``.

``state.json`` holds each batch's key, teacher, submission attempt, provider ids, status
and request counts; ``KEY.requests.jsonl`` holds its requests whole, so a resumed driver
turns output lines into rows, and re-submits lost ones, without the prompt stream. Both
are written aside and renamed into place (``storage.shards.atomic_write_text``), as the
manifest is: a driver killed at any instant leaves the last complete state. The
requests file is written before anything is uploaded; each provider id right after the
call that returned it.

No base URL, API key or key variable name is stored here: a batch names its teacher,
and the job says how to reach it. Not covered: object-store outputs (``s3://``).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.errors import OutputError
from datagen.prompts import Request
from datagen.storage.shards import atomic_write_text

DIR = "batches"
STATE_FILE = "state.json"
# The provider's statuses after which a batch changes no more.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
PREPARING = "preparing"  # ours: its requests are written, the provider may not know it yet


@dataclass
class Batch:
    key: str  # ours: b00001, ...; also the batch's metadata at the provider
    teacher: str
    attempt: int  # this batch is its rows' attempt-th submission
    rows: int
    bytes: int
    id: str | None = None
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    status: str = PREPARING
    counts: dict[str, int] = field(default_factory=dict)  # the provider's request_counts
    errors: str | None = None  # why the provider failed the whole batch
    created_at: int | None = None  # provider's clock, epoch seconds
    ended_at: int | None = None
    collected: bool = False  # its rows were handed to the run (answered, failed or submitted again)

    @property
    def open(self) -> bool:
        return self.id is not None and self.status not in TERMINAL


class BatchState:
    def __init__(self, root: Path, data: dict[str, Any] | None = None):
        self.dir = Path(root) / DIR
        data = data or {}
        # Tags this output's batches at the provider (metadata), so one created just
        # before a crash is found again rather than paid twice.
        self.token: str = data.get("token") or secrets.token_hex(8)
        self.batches: dict[str, Batch] = {b["key"]: Batch(**b) for b in data.get("batches", [])}

    @classmethod
    def load(cls, root: Path) -> BatchState:
        path = Path(root) / DIR / STATE_FILE
        if not path.exists():
            return cls(root)
        try:
            return cls(root, json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise OutputError(f"{path} is unreadable ({exc}); its batches cannot be followed") from None

    @classmethod
    def peek(cls, root: Path) -> BatchState | None:
        """The state of an output that has one, else None (``inspect``)."""
        return cls.load(root) if (Path(root) / DIR / STATE_FILE).exists() else None

    def save(self) -> None:
        data = {"token": self.token, "batches": [dataclasses.asdict(b) for b in self.batches.values()]}
        self._write(STATE_FILE, json.dumps(data, indent=1))

    def new_key(self) -> str:
        return f"b{len(self.batches) + 1:05d}"

    def write_requests(self, key: str, reqs: list[Request]) -> None:
        self._write(f"{key}.requests.jsonl",
                    "".join(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n" for r in reqs))

    def read_requests(self, key: str) -> list[Request]:
        path = self.dir / f"{key}.requests.jsonl"
        try:
            return [Request(**json.loads(line)) for line in path.read_text().splitlines() if line]
        except (OSError, ValueError, TypeError) as exc:
            raise OutputError(f"{path} is unreadable ({exc}); the rows of batch {key} cannot be matched") from None

    def _write(self, name: str, text: str) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / name, text)
        except OSError as exc:
            raise OutputError(f"cannot write {self.dir / name}: {exc}") from None
