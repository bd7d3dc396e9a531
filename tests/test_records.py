"""The record contract: stable row ids, the Arrow schema, schema versioning, and the
deterministic prompt stream of the quickstart job. Fast: no Ray, no vLLM, no network."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml

from datagen import records
from datagen.config import load_job
from datagen.prompts import PromptStream

from .conftest import REPO

QUICKSTART = REPO / "examples" / "quickstart.yaml"

MESSAGES = [
    {"role": "system", "content": "Reply with JSON only."},
    {"role": "user", "content": "Order 12345: the lamp is broken."},
]
TEACHER = {"name": "smollm2", "backend": "vllm", "model": "embedded:smollm2-135m-instruct", "revision": "abc"}
SAMPLING = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 48, "logprobs": 20, "stop": [], "job_seed": 7}


def rid(messages=MESSAGES, teacher=TEACHER, sampling=SAMPLING, sample_index=0) -> str:
    return records.row_id(messages=messages, teacher=teacher, sampling=sampling, sample_index=sample_index)


# --------------------------------------------------------------------------- row ids

_ID_SCRIPT = r"""
import json, sys
from datagen import records
from datagen.config import load_job
from datagen.prompts import PromptStream

messages = [{"role": "system", "content": "Reply with JSON only."},
            {"role": "user", "content": "Order 12345: the lamp is broken."}]
teacher = {"name": "smollm2", "backend": "vllm", "model": "embedded:smollm2-135m-instruct", "revision": "abc"}
sampling = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 48, "logprobs": 20, "stop": [], "job_seed": 7}
stream = list(PromptStream(load_job(sys.argv[1]), run_fingerprint="fp"))
print(json.dumps({
    "row_id": records.row_id(messages=messages, teacher=teacher, sampling=sampling, sample_index=0),
    "prompt_id": records.prompt_id(messages),
    "stream": [[r.row_id, r.prompt_id, r.seed] for r in stream],
}))
"""


def _ids_in_subprocess(hashseed: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    proc = subprocess.run([sys.executable, "-c", _ID_SCRIPT, str(QUICKSTART)], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_row_id_stable_across_processes_and_hash_seeds():
    a = _ids_in_subprocess("1")
    b = _ids_in_subprocess("4242")
    assert a == b
    # ... and equal to this process's values (whatever its hash seed)
    assert a["row_id"] == rid()
    assert a["prompt_id"] == records.prompt_id(MESSAGES)
    here = [[r.row_id, r.prompt_id, r.seed] for r in PromptStream(load_job(QUICKSTART), run_fingerprint="fp")]
    assert a["stream"] == here
    assert len(a["stream"]) == 100


def test_row_id_is_a_hex_digest():
    r = rid()
    assert len(r) == 32
    int(r, 16)


def test_row_id_independent_of_dict_key_order():
    reordered_teacher = dict(reversed(list(TEACHER.items())))
    reordered_sampling = dict(reversed(list(SAMPLING.items())))
    reordered_messages = [dict(reversed(list(m.items()))) for m in MESSAGES]
    assert rid(messages=reordered_messages, teacher=reordered_teacher, sampling=reordered_sampling) == rid()


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [MESSAGES[0], {"role": "user", "content": "Order 12346: the lamp is broken."}]},
        {"messages": MESSAGES[1:]},
        {"messages": [MESSAGES[0], {"role": "assistant", "content": MESSAGES[1]["content"]}]},
        {"teacher": TEACHER | {"name": "other"}},
        {"teacher": TEACHER | {"model": "embedded:other-model"}},
        {"teacher": TEACHER | {"backend": "openai"}},
        {"sampling": SAMPLING | {"temperature": 0.8}},
        {"sampling": SAMPLING | {"top_p": 0.9}},
        {"sampling": SAMPLING | {"max_tokens": 49}},
        {"sampling": SAMPLING | {"logprobs": None}},
        {"sampling": SAMPLING | {"stop": ["\n"]}},
        {"sampling": SAMPLING | {"job_seed": 8}},
        {"sample_index": 1},
    ],
    ids=["prompt-text", "prompt-turns", "prompt-role", "teacher-name", "teacher-model", "teacher-backend",
         "temperature", "top_p", "max_tokens", "logprobs", "stop", "job-seed", "sample-index"],
)
def test_row_id_changes_with_identity(change: dict[str, Any]):
    assert rid(**change) != rid()


@pytest.mark.parametrize("revision", [None, "main", "0123abcd", "/some/local/snapshot/path"])
def test_row_id_ignores_teacher_revision(revision):
    assert rid(teacher=TEACHER | {"revision": revision}) == rid()
    # absent altogether is also the same row
    assert rid(teacher={k: v for k, v in TEACHER.items() if k != "revision"}) == rid()


def test_prompt_id_depends_on_messages_only():
    assert records.prompt_id(MESSAGES) == records.prompt_id(copy.deepcopy(MESSAGES))
    assert records.prompt_id(MESSAGES) != records.prompt_id(MESSAGES[1:])
    assert records.prompt_id(MESSAGES) != rid()


# --------------------------------------------------------------------------- Arrow table


def _full_row() -> dict[str, Any]:
    row = records.empty_row()
    row.update(
        row_id=rid(), prompt_id=records.prompt_id(MESSAGES), sample_index=0, messages=MESSAGES,
        response='{"order_id": "12345"}', finish_reason="stop",
        teacher=TEACHER, sampling={"temperature": 0.7, "top_p": 1.0, "max_tokens": 48, "seed": 3,
                                   "logprobs": 2, "stop": []},
        usage={"prompt_tokens": 10, "completion_tokens": 2},
        token_ids=[1, 2], token_logprobs_q=records.quantize_logprobs([-0.1, -0.2]), top_ids=[[1, 5], [2, 6]],
        top_logprobs_q=records.encode_top([[1, 5], [2, 6]], [[-0.1, -2.0], [-0.2, -3.0]])[1],
        verdicts=[{"filter": "format", "keep": True, "reason": None, "score": None, "details": None}],
        license={"teacher": "Apache-2.0", "seed": "Apache-2.0", "template": "Apache-2.0"},
    )
    return row


def test_to_table_has_exactly_the_schema():
    table = records.to_table([_full_row(), records.empty_row() | {"row_id": "x", "prompt_id": "p",
                                                                   "sample_index": 1, "messages": []}])
    assert table.schema.equals(records.SCHEMA, check_metadata=True)
    assert table.schema.metadata[b"datagen.schema_version"] == records.SCHEMA_VERSION.encode()
    assert tuple(table.column_names) == records.FIELDS
    assert table.num_rows == 2
    back = table.to_pylist()[0]
    assert back["messages"] == MESSAGES
    assert back["teacher"] == TEACHER
    assert back["top_ids"] == [[1, 5], [2, 6]]
    assert back["top_logprobs_q"] == [[6, 122], [13, 179]]  # 1/64-nat codes, delta along the top-k


def test_to_table_of_no_rows_keeps_the_schema():
    table = records.to_table([])
    assert table.num_rows == 0
    assert table.schema.equals(records.SCHEMA, check_metadata=True)


def test_to_table_fills_missing_keys_with_nulls():
    table = records.to_table([{"row_id": "r", "prompt_id": "p", "sample_index": 0, "messages": MESSAGES}])
    assert table.schema.equals(records.SCHEMA, check_metadata=True)
    assert table.column("response").to_pylist() == [None]
    assert table.column("error").to_pylist() == [None]


@pytest.mark.parametrize("extra", ["responce", "score", "extra_field"])
def test_to_table_rejects_unknown_keys(extra: str):
    with pytest.raises(ValueError, match=extra):
        records.to_table([_full_row(), _full_row() | {extra: 1}])


def test_to_table_rejects_wrong_types():
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        records.to_table([_full_row() | {"sample_index": "zero"}])


def test_empty_row_has_every_field():
    row = records.empty_row()
    assert tuple(row) == records.FIELDS
    assert all(v is None for v in row.values())


# --------------------------------------------------------------------------- versioning


def _bump(major: int = 0, minor: int = 0) -> str:
    ma, mi = (int(x) for x in records.SCHEMA_VERSION.split(".")[:2])
    return f"{ma + major}.{mi + minor if not major else 9}"


def test_schema_version_accepts_own_and_minor_bump():
    records.check_schema_version(records.SCHEMA_VERSION, where="shard")
    records.check_schema_version(_bump(minor=1), where="shard")
    records.check_schema_version(_bump(minor=7), where="shard")


@pytest.mark.parametrize("version", [_bump(major=1), _bump(major=10), _bump(major=-1)])
def test_schema_version_refuses_other_major(version: str):
    with pytest.raises(ValueError) as info:
        records.check_schema_version(version, where="shard-00001.parquet")
    msg = str(info.value)
    assert msg.startswith("shard-00001.parquet: ")
    assert version in msg


def test_schema_version_missing_is_refused():
    with pytest.raises(ValueError, match="no datagen schema version"):
        records.check_schema_version(None, where="shard")


# --------------------------------------------------------------------------- prompt stream


def _quickstart_variant(tmp_path: Path, name: str, **edits: Any) -> Path:
    """The quickstart job with edits, as a job file in tmp_path (template made absolute)."""
    data = yaml.safe_load(QUICKSTART.read_text())
    data["prompts"]["template"] = str((QUICKSTART.parent / data["prompts"]["template"]).resolve())
    data["output"]["path"] = str(tmp_path / "out")
    for key, value in edits.items():
        if key == "seed":
            data["seed"] = value
        elif key == "count":
            data["prompts"]["count"] = value
        elif key == "teacher":
            data["teachers"][0].update(value)
        elif key == "sampling":
            data["teachers"][0]["sampling"].update(value)
        else:
            raise AssertionError(key)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _stream(path: Path) -> list:
    return list(PromptStream(load_job(path), run_fingerprint="fp"))


def test_quickstart_stream_is_deterministic():
    job = load_job(QUICKSTART)
    a = list(PromptStream(job, run_fingerprint="fp"))
    b = list(PromptStream(load_job(QUICKSTART), run_fingerprint="fp"))
    assert len(a) == len(PromptStream(job, run_fingerprint="fp")) == 100
    assert [r.row_id for r in a] == [r.row_id for r in b]
    assert [r.seed for r in a] == [r.seed for r in b]
    assert [r.messages for r in a] == [r.messages for r in b]
    assert len({r.row_id for r in a}) == 100  # no collisions
    assert len({r.prompt_id for r in a}) == 50
    assert all(0 <= r.seed < 2**31 for r in a)
    assert len({r.seed for r in a}) > 90  # per-row seeds, not one seed for all


def test_stream_request_fields(tmp_path: Path):
    reqs = _stream(_quickstart_variant(tmp_path, "q"))
    first = reqs[0]
    assert first.teacher == "smollm2"
    assert [r.sample_index for r in reqs[:2]] == [0, 1]
    assert reqs[0].prompt_id == reqs[1].prompt_id != reqs[2].prompt_id
    assert first.prompt_id == records.prompt_id(first.messages)
    assert first.provenance["template_id"] == "support-extract"
    assert first.provenance["job"] == "quickstart"
    assert first.provenance["run_fingerprint"] == "fp"
    assert first.messages[-1]["role"] == "user"
    # two worked examples (user/assistant pairs) after the system turn
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant", "user", "assistant", "user"]


def test_different_seed_reorders_the_same_prompts(tmp_path: Path):
    # count: null uses every seed, so only the order may depend on the job seed
    a = _stream(_quickstart_variant(tmp_path, "a", count=None))
    b = _stream(_quickstart_variant(tmp_path, "b", count=None, seed=8))
    pa_, pb = [r.prompt_id for r in a], [r.prompt_id for r in b]
    assert pa_ != pb
    assert sorted(pa_) == sorted(pb)
    assert len(a) == len(b)
    # the job seed is part of the sampling identity: other samples, other rows
    assert {r.row_id for r in a}.isdisjoint({r.row_id for r in b})


def test_same_seed_different_file_same_ids(tmp_path: Path):
    a = _stream(_quickstart_variant(tmp_path, "a"))
    b = _stream(_quickstart_variant(tmp_path, "b"))
    assert [r.row_id for r in a] == [r.row_id for r in b] == [r.row_id for r in _stream(QUICKSTART)]


def test_n_doubles_rows_with_distinct_ids(tmp_path: Path):
    one = _stream(_quickstart_variant(tmp_path, "n1", sampling={"n": 1}))
    two = _stream(_quickstart_variant(tmp_path, "n2", sampling={"n": 2}))
    four = _stream(_quickstart_variant(tmp_path, "n4", sampling={"n": 4}))
    assert len(one) == 50 and len(two) == 100 and len(four) == 200
    assert len({r.row_id for r in two}) == 100
    assert len({r.row_id for r in four}) == 200
    # n is the range of sample indices, not part of a row's identity: raising it adds rows
    assert {r.row_id for r in one} < {r.row_id for r in two} < {r.row_id for r in four}
    assert {r.prompt_id for r in one} == {r.prompt_id for r in two}


def test_stream_ids_ignore_teacher_revision(tmp_path: Path):
    base = _stream(_quickstart_variant(tmp_path, "base"))
    rev = _stream(_quickstart_variant(tmp_path, "rev", teacher={"revision": "v2-snapshot"}))
    assert [r.row_id for r in base] == [r.row_id for r in rev]


@pytest.mark.parametrize(
    "edit",
    [{"sampling": {"temperature": 0.2}}, {"sampling": {"max_tokens": 49}}, {"teacher": {"name": "other"}},
     {"teacher": {"model": "embedded:other"}}],
    ids=["temperature", "max_tokens", "teacher-name", "teacher-model"],
)
def test_stream_ids_change_with_teacher_or_sampling(tmp_path: Path, edit: dict[str, Any]):
    base = _stream(_quickstart_variant(tmp_path, "base"))
    changed = _stream(_quickstart_variant(tmp_path, "changed", **edit))
    assert [r.prompt_id for r in base] == [r.prompt_id for r in changed]
    assert {r.row_id for r in base}.isdisjoint({r.row_id for r in changed})


def test_count_takes_a_prefix_of_the_shuffled_seeds(tmp_path: Path):
    ten = _stream(_quickstart_variant(tmp_path, "c10", count=10))
    twenty = _stream(_quickstart_variant(tmp_path, "c20", count=20))
    assert len(ten) == 20 and len(twenty) == 40
    assert [r.row_id for r in twenty[:20]] == [r.row_id for r in ten]


# --------------------------------------------------------------------------- logprobs


def test_logprob_quantisation_error_is_bounded_over_the_whole_range():
    rng = np.random.default_rng(0)
    lp = np.concatenate([-rng.exponential(3.0, 100_000), -rng.uniform(0, 1000.0, 100_000), [0.0, -1e-9]])
    q = records.quantize_logprobs(lp.tolist())
    back = records.dequantize_logprobs(q)
    # half a step (1/128 nat, under the 0.01 KD needs), plus float32's rounding of the decoded value
    assert np.max(np.abs(back - lp)) <= 0.5 / records.LOGPROB_SCALE + 1e-4
    assert all(isinstance(v, int) and 0 <= v <= records.LOGPROB_Q_MAX for v in q)


def test_logprob_quantisation_saturates_instead_of_wrapping():
    q = records.quantize_logprobs([-2000.0, float("-inf"), float("nan"), 0.0])
    assert q[:3] == [records.LOGPROB_Q_MAX] * 3
    assert q[3] == 0
    assert records.quantize_logprobs(None) is None


def test_top_k_round_trip_is_delta_coded_and_sorted_most_likely_first():
    rng = np.random.default_rng(1)
    lps = np.sort(-rng.exponential(4.0, (50, 20)), axis=1)[:, ::-1]
    ids = rng.integers(0, 49152, (50, 20))
    s_ids, q = records.encode_top(ids.tolist(), lps.tolist())
    assert s_ids == ids.tolist()  # already most likely first: order kept
    assert all(d >= 0 for pos in q for d in pos)  # codes only grow along a position's top-k
    np.testing.assert_allclose(records.decode_top(q), lps, atol=0.5 / records.LOGPROB_SCALE + 1e-4)
    # a backend that sends a position out of order: ids move with their log-probs
    s_ids, q = records.encode_top([[7, 8, 9]], [[-3.0, -0.5, -1.0]])
    assert s_ids == [[8, 9, 7]]
    np.testing.assert_allclose(records.decode_top(q), [[-0.5, -1.0, -3.0]], atol=0.008)
    assert records.encode_top(None, None) == (None, None) and records.decode_top(None) is None


def test_quantised_logprobs_survive_parquet_exactly(tmp_path):
    import pyarrow.parquet as pq

    row = _full_row()
    pq.write_table(records.to_table([row]), tmp_path / "r.parquet")
    back = pq.read_table(tmp_path / "r.parquet").to_pylist()[0]
    assert back["top_logprobs_q"] == row["top_logprobs_q"]
    np.testing.assert_allclose(records.decode_top(back["top_logprobs_q"]), [[-0.1, -2.0], [-0.2, -3.0]],
                               atol=0.008)
