"""Seed sources: the rows that fill a template, read from JSONL, CSV, Parquet, plain text
(one prompt per line) or a folder written by HF ``datasets``' ``save_to_disk``.

``READERS`` is the registry (format -> a generator of ``(row number, row or problem)``).
Every reader numbers rows the way a person finds them: line numbers for line-based files
(JSONL, CSV, text), 1-based row positions for Parquet and ``datasets`` folders.

A bad row (invalid JSON, a missing mapped column, a duplicate id, …) is reported as
``FILE:LINE: problem`` or ``FILE: row N: problem``. With ``max_bad_rows: 0`` (the default)
the first one is an error; above that, up to that many are skipped, each reported, and
every other row is kept. A source whose rows are all bad is an error either way.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen.config import SeedSource
from datagen.errors import ConfigError, MissingExtra


class BadRow(str):
    """What is wrong with one source row (a reader yields it instead of the row)."""


Rows = Iterator[tuple[int, "dict[str, Any] | BadRow"]]


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"seed file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"seed file is unreadable: {path}: {exc}") from None


def _jsonl(path: Path) -> Rows:
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, BadRow(f"invalid JSON: {exc.msg}")
            continue
        yield n, row if isinstance(row, dict) else BadRow("each line must be a JSON object")


def _text(path: Path) -> Rows:
    for n, line in enumerate(_lines(path), 1):
        if line.strip():
            yield n, {"text": line.strip()}


def _csv(path: Path) -> Rows:
    text = "\n".join(_lines(path))  # the errors of a missing or undecodable file, as for every format
    reader = csv.DictReader(text.splitlines(keepends=True))  # ends kept: a quoted field may span lines
    width = len(reader.fieldnames or [])
    try:
        for row in reader:
            n = reader.line_num
            if None in row:
                yield n, BadRow(f"{width + len(row[None])} fields where the header has {width}")
            elif any(v is None for v in row.values()):
                yield n, BadRow(f"fewer fields than the header's {width}")
            else:
                yield n, row
    except csv.Error as exc:
        raise ConfigError(f"{path}:{reader.line_num}: unreadable CSV: {exc}") from None


def _parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise ConfigError(f"seed file not found: {path}") from None
    except (OSError, pa.ArrowException) as exc:
        raise ConfigError(f"seed file is unreadable: {path}: {exc}") from None
    n = 0
    for batch in table.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _hf(path: Path) -> Rows:
    try:
        import datasets
    except ImportError:
        raise MissingExtra("datasets", "hf", f"the seed folder {path}") from None
    if not path.is_dir():
        raise ConfigError(f"seed folder not found: {path} (a `datasets` save_to_disk folder)")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ConfigError(f"{path}: not a `datasets` save_to_disk folder: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise ConfigError(f"{path}: holds the splits {sorted(ds)}; point seeds.path at one of them "
                          f"(e.g. {path / sorted(ds)[0]})")
    for n, row in enumerate(ds, 1):
        yield n, row


READERS = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet, "text": _text, "hf": _hf}
_SUFFIXES = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
LINE_BASED = {"jsonl", "csv", "text"}


def source_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        return "hf"
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: cannot tell the seed format from the suffix {path.suffix!r}; set "
                          f"`format:` to one of {', '.join(READERS)}")
    return fmt


def where(path: Path, fmt: str, n: int) -> str:
    return f"{path}:{n}" if fmt in LINE_BASED else f"{path}: row {n}"


@dataclass
class Seeds:
    rows: list[dict[str, Any]]  # template variables (mapped columns added)
    ids: list[str]
    problems: list[str] = field(default_factory=list)  # "FILE:LINE: problem", for skipped rows


def read_seeds(src: SeedSource, path: Path) -> Seeds:
    """Read, map and check a seed source (``path`` is ``src.path`` resolved)."""
    fmt = source_format(path, src.format)
    id_field = None if fmt == "text" else src.id_field  # a text line's id is its line number
    out = Seeds(rows=[], ids=[])
    seen: dict[str, int] = {}
    for n, row in READERS[fmt](path):
        problem = row if isinstance(row, BadRow) else None
        if problem is None:
            row, problem = _map(row, src.columns, id_field, n)
        if problem is None:
            sid = str(n) if id_field is None else str(row[id_field])
            if sid in seen:
                problem = BadRow(f"duplicate seed id {sid!r} (first at {seen[sid]})")
            else:
                seen[sid] = n
                out.rows.append(row)
                out.ids.append(sid)
                continue
        out.problems.append(f"{where(path, fmt, n)}: {problem}")
        if len(out.problems) > src.max_bad_rows:
            more = f" ({len(out.problems)} bad rows, more than seeds.max_bad_rows = {src.max_bad_rows})" \
                if src.max_bad_rows else ""
            raise ConfigError(out.problems[-1] + more)
    if not out.rows:
        raise ConfigError(f"{path}: the seed source has no usable rows")
    return out


def _map(row: dict[str, Any], columns: dict[str, str], id_field: str | None,
         n: int) -> tuple[dict[str, Any], BadRow | None]:
    if id_field is not None:
        sid = row.get(id_field)
        if sid is None:
            return row, BadRow(f"no {id_field!r} field (set seeds.id_field: null to number the rows)")
        if not isinstance(sid, (str, int)) or isinstance(sid, bool):
            return row, BadRow(f"seed {id_field!r} must be a string or an integer")
    if not columns:
        return row, None
    out = dict(row)
    for var, col in columns.items():
        if row.get(col) is None:
            return row, BadRow(f"no value in column {col!r} (mapped to the variable {var!r})")
        out[var] = row[col]
    return out, None
