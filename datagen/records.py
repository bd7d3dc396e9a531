"""The record contract: one row of a datagen dataset and its Arrow schema.

Generation, filtering, the shard store and the trainer all speak this module's
language. A row is a plain ``dict`` whose keys are the schema's fields (plain dicts
keep the hot path free of per-row object construction); ``SCHEMA`` is the one
definition of their types. Facts that later stages add go into the namespaced
struct fields below (``provenance``, ``license``, ``verdicts``, ``timings``), never
into new top-level columns.

Versioning: ``SCHEMA_VERSION`` is written into every shard's Parquet metadata and
into the manifest. Adding a nullable field is a minor bump; renaming or retyping a
field is a major bump and readers refuse shards with a major version they do not
know.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "2.0"  # 2.0: quantised logprob columns; provenance.axes/reference/logprobs_by; license.logprobs; usage.cost_usd

# Streams a run writes. ``accepted`` rows passed every filter; ``rejected`` rows were
# dropped by a filter verdict (a real check on the data); ``failed`` rows never got a
# usable answer from the teacher (infrastructure or protocol failure, retried on
# resume -- see docs/architecture.md).
STREAMS = ("accepted", "rejected", "failed")

_message = pa.struct([("role", pa.string()), ("content", pa.string())])
_verdict = pa.struct(
    [
        ("filter", pa.string()),
        ("keep", pa.bool_()),
        ("reason", pa.string()),
        ("score", pa.float64()),
        ("details", pa.string()),
    ]
)

SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("messages", pa.list_(_message), nullable=False),
        pa.field("response", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field(
            "teacher",
            pa.struct(
                [
                    ("name", pa.string()),
                    ("backend", pa.string()),
                    ("model", pa.string()),
                    ("revision", pa.string()),
                ]
            ),
        ),
        pa.field(
            "sampling",
            pa.struct(
                [
                    ("temperature", pa.float64()),
                    ("top_p", pa.float64()),
                    ("max_tokens", pa.int32()),
                    ("seed", pa.int64()),
                    ("logprobs", pa.int32()),
                    ("stop", pa.list_(pa.string())),
                ]
            ),
        ),
        pa.field(
            "usage",
            # cost_usd: from the teacher's price table in the job file; null when unpriced
            pa.struct([("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
                       ("cost_usd", pa.float64())]),
        ),
        # Teacher signal for KD. One entry per generated token; null when the backend
        # gives no logprobs. top_ids[i] / top_logprobs_q[i] are the teacher's top-k at
        # position i, most likely first (the sampled token may or may not be among them).
        # Log-probs are stored quantised (``quantize_logprobs``, ``encode_top``/``decode_top``).
        pa.field("token_ids", pa.list_(pa.int32())),
        pa.field("token_logprobs_q", pa.list_(pa.uint16())),
        pa.field("top_ids", pa.list_(pa.list_(pa.int32()))),
        pa.field("top_logprobs_q", pa.list_(pa.list_(pa.uint16()))),
        pa.field("tokenizer_fingerprint", pa.string()),
        pa.field(
            "provenance",
            pa.struct(
                [
                    ("job", pa.string()),
                    ("run_fingerprint", pa.string()),
                    ("template_id", pa.string()),
                    ("template_version", pa.string()),
                    ("template_hash", pa.string()),
                    ("seed_source", pa.string()),
                    ("seed_ids", pa.list_(pa.string())),
                    # The diversity-axis values this prompt was dealt (null: no axes). A list
                    # of pairs rather than an Arrow map, which HF `datasets` cannot load.
                    ("axes", pa.list_(pa.struct([("name", pa.string()), ("value", pa.string())]))),
                    # Canonical JSON of the seed columns the template names as references
                    # (a math answer, a code task's tests) for filters to check against.
                    ("reference", pa.string()),
                    # set by ``datagen rescore``: name/backend/model@revision of the log-prob teacher
                    ("logprobs_by", pa.string()),
                ]
            ),
        ),
        pa.field("verdicts", pa.list_(_verdict)),
        pa.field("dedupe_cluster", pa.string()),
        pa.field(
            "license",
            # ``logprobs``: the terms of the teacher whose log-probs the row carries when that
            # is not the teacher who wrote the text (``datagen rescore``); null otherwise.
            pa.struct([("teacher", pa.string()), ("seed", pa.string()), ("template", pa.string()),
                       ("logprobs", pa.string())]),
        ),
        pa.field(
            "timings",
            pa.struct(
                [
                    ("generated_at", pa.timestamp("ms", tz="UTC")),
                    ("latency_s", pa.float64()),
                    ("attempts", pa.int32()),
                ]
            ),
        ),
        # Set only on rows of the ``failed`` stream: a short code then a message,
        # e.g. "teacher.http_500: Internal Server Error after 4 attempts".
        pa.field("error", pa.string()),
    ],
    metadata={"datagen.schema_version": SCHEMA_VERSION},
)

FIELDS = tuple(SCHEMA.names)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the input to every content hash."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(obj: Any, *, size: int = 16) -> str:
    """Stable hex digest of ``obj`` (blake2b over canonical JSON).

    Never Python's ``hash()``: that is salted per process, so ids would change between
    the run and its resume.
    """
    return hashlib.blake2b(canonical_json(obj).encode(), digest_size=size).hexdigest()


def prompt_id(messages: list[dict[str, str]]) -> str:
    return content_hash({"messages": messages})


def row_id(*, messages: list[dict[str, str]], teacher: dict[str, Any], sampling: dict[str, Any],
           sample_index: int) -> str:
    """The row's identity: prompt + teacher identity + sampling params + sample index.

    Only the teacher fields that change what it would answer take part (name, backend,
    model); the revision is recorded but a re-resolved local path must not change ids.
    """
    who = {k: teacher[k] for k in ("name", "backend", "model")}
    return content_hash(
        {"messages": messages, "teacher": who, "sampling": sampling, "sample_index": sample_index}
    )


# --------------------------------------------------------------------------- logprobs
#
# KD needs the teacher's top-k log-probs per generated token: at k = 20 that is 20 ids and
# 20 log-probs per token, the bulk of a KD dataset. Measured on SmolLM2 output after zstd
# (benchmarks/bench_vllm.py, descriptive answers): float32 log-probs cost ~48 bytes per
# token, fixed-point uint16 ~28, and the same codes delta-coded along the top-k ~20; the
# ids cost ~36 whatever we tried. So log-probs are stored as uint16 codes of -logprob in
# steps of 1/64 nat (error <= 0.0078 everywhere, under the 0.01 KD needs; float16's step
# grows to 0.016 below -32), and a position's top-k codes as deltas from the previous
# rank (the list is most likely first, so codes only grow and deltas are small). Values
# below -1024 saturate: a probability under e^-1024 is zero for any loss.

LOGPROB_SCALE = 64  # code q = round(-logprob * LOGPROB_SCALE); logprob = -q / LOGPROB_SCALE
LOGPROB_Q_MAX = 65535


def quantize_logprobs(values: list[float] | None) -> list[int] | None:
    """Log-probs (one per token) -> uint16 codes; ``-inf``/NaN saturate; None stays None."""
    if values is None:
        return None
    return _codes(values).astype("uint16").tolist()


def _codes(values: Any) -> Any:
    """Log-probs (any shape) -> codes as a float64 array, saturated to [0, LOGPROB_Q_MAX]."""
    import numpy as np

    q = np.rint(-np.asarray(values, dtype=np.float64) * LOGPROB_SCALE)
    return np.clip(np.nan_to_num(q, nan=LOGPROB_Q_MAX, posinf=LOGPROB_Q_MAX), 0, LOGPROB_Q_MAX)


def dequantize_logprobs(q: Any) -> Any:
    """Codes (a list or array, any shape) -> float32 log-probs as a numpy array."""
    import numpy as np

    if q is None:
        return None
    return np.asarray(q, dtype=np.float32) * np.float32(-1.0 / LOGPROB_SCALE)


def encode_top(ids: list[list[int]] | None, logprobs: list[list[float]] | None
               ) -> tuple[list[list[int]] | None, list[list[int]] | None]:
    """A row's top-k (ids and log-probs per position) -> stored ``top_ids``, ``top_logprobs_q``.

    Each position is put most-likely-first (backends already send it so; a stable sort
    keeps their order for ties), then its codes are delta-coded: ``[q0, q1-q0, ...]``.
    """
    if ids is None or logprobs is None:
        return None, None
    import numpy as np

    k = len(ids[0]) if ids else 0
    if k and all(len(p) == k for p in ids) and all(len(p) == k for p in logprobs):
        # The common case, every position with k entries: one pass over the whole row
        # (per-position numpy calls cost ~1 ms a row, the driver's biggest expense).
        q = _codes(logprobs).astype(np.int64)
        order = np.argsort(q, axis=1, kind="stable")
        q = np.take_along_axis(q, order, axis=1)
        return (np.take_along_axis(np.asarray(ids, dtype=np.int64), order, axis=1).tolist(),
                np.diff(q, axis=1, prepend=0).tolist())
    out_ids, out_q = [], []
    for pos_ids, pos_lps in zip(ids, logprobs):
        q = np.asarray(quantize_logprobs(pos_lps), dtype=np.int64)
        order = np.argsort(q, kind="stable")
        q = q[order]
        out_ids.append([int(pos_ids[i]) for i in order])
        out_q.append(np.diff(q, prepend=0).tolist())
    return out_ids, out_q


def decode_top(top_q: Any) -> Any:
    """Stored ``top_logprobs_q`` (one row: a list of per-position delta codes) -> float32
    log-probs, one array per position (a 2-D array when every position has k entries)."""
    import numpy as np

    if top_q is None:
        return None
    rows = [np.cumsum(np.asarray(q, dtype=np.int64)) for q in top_q]
    if rows and all(len(r) == len(rows[0]) for r in rows):
        return dequantize_logprobs(np.stack(rows))
    return [dequantize_logprobs(r) for r in rows]


def decide(verdicts: list[dict[str, Any]]) -> tuple[bool, str | None]:
    """(keep, reason) of a row's verdicts (``Verdict.to_dict``): kept when every verdict
    keeps; the reason is the first drop's. The one place this is decided."""
    for v in verdicts:
        if not v["keep"]:
            return False, v["reason"]
    return True, None


def reason(row: dict[str, Any], stream: str) -> str | None:
    """Why ``row`` is in ``stream``: a failed row's error code, a rejected row's first drop;
    None for an accepted row. What the run's summary and the manifest's counts say."""
    if stream == "failed":
        return (row.get("error") or "error.unknown").split(":", 1)[0]
    if stream == "rejected":
        return decide(row.get("verdicts") or [])[1] or "rejected.unknown"
    return None


def empty_row() -> dict[str, Any]:
    return dict.fromkeys(FIELDS)


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> a table of exactly ``SCHEMA`` (unknown keys are an error, not dropped)."""
    for row in rows:
        extra = row.keys() - set(FIELDS)
        if extra:
            raise ValueError(f"row has fields outside the record schema: {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def check_schema_version(version: str | None, *, where: str) -> None:
    if version is None:
        raise ValueError(f"{where}: no datagen schema version recorded")
    major = version.split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise ValueError(
            f"{where}: schema version {version} is not readable by this datagen "
            f"(reads {SCHEMA_VERSION.split('.')[0]}.x)"
        )
