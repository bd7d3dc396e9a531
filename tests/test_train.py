"""The trainer: KD loss against a reference, masking, packing, tokenizer refusal, exact
resume, checkpoint integrity, student inits. Fast: a 2-layer student of ~3M params on a
store written by the real ShardStore with rows tokenized by the embedded teacher's tokenizer.
(The end-to-end test with shards from the real teacher is tests/test_train_e2e.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from datagen import records
from datagen.cli import main
from datagen.config import Output
from datagen.errors import ConfigError
from datagen.storage.shards import ShardStore
from datagen.train import checkpoint, data, losses, student
from datagen.train.config import Student, load_train
from datagen.train.trainer import Trainer, forward_losses, train

TEACHER = "embedded:smollm2-135m-instruct"
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": True}
PRODUCTS = ["desk lamp", "running shoes", "coffee grinder", "phone case", "yoga mat", "kettle"]


@pytest.fixture(scope="module")
def tok():
    return student.load_tokenizer(TEACHER)


def make_row(tok, i: int, *, fingerprint: str | None = None, k: int = 5) -> dict:
    """A row shaped like the vLLM teacher's: token ids of the answer, top-k per token with
    the sampled token first and log-probs that leave a small tail."""
    gen = torch.Generator().manual_seed(i)
    product = PRODUCTS[i % len(PRODUCTS)]
    messages = [{"role": "system", "content": "Extract the order number and product as JSON."},
                {"role": "user", "content": f"Order {10000 + i} of a {product} is late."}]
    response = json.dumps({"order_id": str(10000 + i), "product": product})
    ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    top_ids, top_lps = [], []
    for t in ids:
        others = torch.randint(3, 5000, (k - 1,), generator=gen).tolist()
        probs = torch.softmax(torch.randn(k, generator=gen) * 2, 0).sort(descending=True).values * 0.97
        top_ids.append([t] + others)
        top_lps.append(probs.log().tolist())
    row = records.empty_row()
    row.update(row_id=records.content_hash({"i": i}), prompt_id=records.prompt_id(messages), sample_index=0,
               messages=messages, response=response, finish_reason="stop",
               teacher={"name": "smollm2", "backend": "vllm", "model": TEACHER, "revision": "x"},
               token_ids=ids, token_logprobs_q=records.quantize_logprobs([lp[0] for lp in top_lps]), top_ids=top_ids,
               top_logprobs_q=records.encode_top(top_ids, top_lps)[1],
               tokenizer_fingerprint=fingerprint or student.fingerprint(tok),
               license={"teacher": "Apache-2.0", "seed": "Apache-2.0", "template": "Apache-2.0"},
               verdicts=[{"filter": "format", "keep": True, "reason": "ok", "score": None, "details": None}])
    return row


def make_store(root: Path, rows: list[dict]) -> Path:
    store = ShardStore.create(root, Output(path=root, shard_rows=16, row_group_rows=8),
                              job_meta={"name": "t", "run_fingerprint": "f", "job": {}})
    try:
        for r in rows:
            store.add("accepted", r)
        store.commit_all()
    finally:
        store.close()
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory, tok) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "out", [make_row(tok, i) for i in range(40)])


def write_cfg(tmp_path: Path, store: Path, **over) -> Path:
    cfg = {"name": "t", "seed": 3, "data": {"path": str(store), "holdout_fraction": 0.1},
           "student": {"init": "config", "tokenizer": TEACHER, "config": TINY},
           "loss": {"kd_weight": 0.5, "temperature": 2.0},
           "optim": {"lr": 1e-3, "warmup_steps": 2},
           "steps": 12, "batch_size": 2, "seq_len": 128, "shuffle_buffer": 8, "checkpoint_every": 5,
           "output": str(tmp_path / "run")}
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------- KD loss


def reference_kl(logits, top_ids, top_lps, *, temperature, tail):
    """Dense float64 computation, one position at a time, straight from the definitions."""
    out = []
    for lg, ids, lps in zip(logits.double(), top_ids, top_lps.double()):
        q = torch.softmax(lg / temperature, 0)
        if tail == "renormalize":
            p_top = torch.softmax(lps / temperature, 0)
            p = torch.zeros_like(q)
            p[ids] = p_top
            nz = p > 0
            out.append(float((p[nz] * (p[nz].log() - q[nz].log())).sum()))
        else:
            p_top = lps.exp()
            q_top = q[ids]
            kl = float((p_top * (p_top.log() - q_top.log())).sum())
            p_tail, q_tail = 1 - float(p_top.sum()), 1 - float(q_top.sum())
            out.append(kl + p_tail * math.log(p_tail / q_tail))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature,tail", [(1.0, "renormalize"), (2.0, "renormalize"), (0.5, "renormalize"),
                                              (1.0, "bucket")])
def test_kd_loss_matches_reference(temperature, tail):
    gen = torch.Generator().manual_seed(0)
    n, v, k = 6, 50, 5
    logits = torch.randn(n, v, generator=gen) * 3
    teacher = torch.log_softmax(torch.randn(n, v, generator=gen) * 3, -1)
    top_lps, top_ids = teacher.topk(k, dim=-1)
    got = losses.kd_loss(logits, top_ids, top_lps, torch.ones(n, k, dtype=torch.bool),
                         temperature=temperature, tail=tail)
    want = reference_kl(logits, top_ids, top_lps, temperature=temperature, tail=tail)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (got, want)
    assert (got >= -1e-6).all()


def test_kd_loss_masks_padding_and_is_zero_at_the_optimum():
    n, v, k = 3, 20, 4
    teacher = torch.log_softmax(torch.randn(n, v) * 2, -1)
    top_lps, top_ids = teacher.topk(k, dim=-1)
    mask = torch.ones(n, k, dtype=torch.bool)
    # padding entries (masked) must not change the loss, whatever they hold
    padded_ids = torch.cat([top_ids, torch.zeros(n, 2, dtype=torch.long)], -1)
    padded_lps = torch.cat([top_lps, torch.full((n, 2), 5.0)], -1)
    padded_mask = torch.cat([mask, torch.zeros(n, 2, dtype=torch.bool)], -1)
    a = losses.kd_loss(torch.randn(n, v), top_ids, top_lps, mask)
    logits = torch.randn(n, v)
    a = losses.kd_loss(logits, top_ids, top_lps, mask)
    b = losses.kd_loss(logits, padded_ids, padded_lps, padded_mask)
    assert torch.allclose(a, b)
    # bucket: a student equal to the teacher scores 0
    assert losses.kd_loss(teacher, top_ids, top_lps, mask, tail="bucket").abs().max() < 1e-5


# --------------------------------------------------------------------------- masking, packing


def test_prompt_tokens_carry_no_loss(tok):
    row = make_row(tok, 1)
    enc = data.Encoder(tok, fingerprint=student.fingerprint(tok), use_kd=True, seq_len=256)
    ex = enc(row)
    n_prompt = len(data.prompt_ids(tok, row["messages"]))
    assert ex.input_ids[n_prompt:] == row["token_ids"]
    # every target is a generated token, in order, predicted from the position before it
    assert [t for t in ex.targets if t != data.IGNORE] == row["token_ids"]
    assert all(t == data.IGNORE for t in ex.targets[: n_prompt - 1])
    assert [i for i, kd in enumerate(ex.kd) if kd is not None] == list(range(n_prompt - 1, len(ex.input_ids) - 1))
    # and the trainer's loss uses exactly those positions: compare with a full-logits computation
    torch.manual_seed(0)
    model, _ = student.build(Student(init="config", tokenizer=TEACHER, config=TINY), seed=0)
    batch = data.collate(list(data.pack(iter([ex]), seq_len=256, pad_id=tok.pad_token_id)), k=5)
    ce, kd, _ = forward_losses(model, batch, device="cpu")
    full = model(input_ids=batch["input_ids"]).logits[0]
    pos = torch.arange(n_prompt - 1, len(ex.input_ids) - 1)
    want = torch.nn.functional.cross_entropy(full[pos], torch.tensor(row["token_ids"]), reduction="none")
    assert ce.shape == want.shape and torch.allclose(ce, want, atol=1e-5)
    assert kd.shape == (len(row["token_ids"]),)


def test_packed_documents_do_not_see_each_other(tok):
    enc = data.Encoder(tok, fingerprint=student.fingerprint(tok), use_kd=True, seq_len=512)
    a, b = enc(make_row(tok, 1)), enc(make_row(tok, 2))
    model, _ = student.build(Student(init="config", tokenizer=TEACHER, config=TINY), seed=0)
    packed = data.collate(list(data.pack(iter([a, b]), seq_len=512, pad_id=0)), k=5)
    alone = data.collate(list(data.pack(iter([b]), seq_len=512, pad_id=0)), k=5)
    ce_packed, _, _ = forward_losses(model, packed, device="cpu")
    ce_alone, _, _ = forward_losses(model, alone, device="cpu")
    n_a = sum(t != data.IGNORE for t in a.targets)
    assert torch.allclose(ce_packed[n_a:], ce_alone, atol=1e-5)


# --------------------------------------------------------------------------- refusals


def test_kd_refuses_a_student_with_another_tokenizer(tmp_path, tok, capsys):
    rows = [make_row(tok, i, fingerprint="sha256:0123456789abcdef") for i in range(6)]
    src = make_store(tmp_path / "other", rows)
    cfg = write_cfg(tmp_path, src, data={"path": str(src), "holdout_fraction": 0.0})
    assert main(["train", str(cfg), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tokenized with sha256:0123456789abcdef" in err and student.fingerprint(tok) in err
    assert "kd_weight: 0" in err
    # SFT (no KD) on the same rows is allowed: the text is re-tokenised by the student
    cfg = write_cfg(tmp_path, src, data={"path": str(src), "holdout_fraction": 0.0}, loss={"kd_weight": 0.0},
                    steps=2, output=str(tmp_path / "sft"))
    assert main(["train", str(cfg), "-q"]) == 0


def test_the_fingerprint_is_the_vocabulary_and_special_tokens_and_nothing_else(tok):
    from datagen.teachers.base import tokenizer_fingerprint

    vocab, special = tok.get_vocab(), tok.special_tokens_map
    fp = student.fingerprint(tok)
    assert tokenizer_fingerprint(dict(reversed(list(vocab.items()))), dict(special)) == fp  # order-free
    a, b = "hello", "Ġworld"
    changed = {
        "two ids swapped": {**vocab, a: vocab[b], b: vocab[a]},
        "one token respelled": {**{k: v for k, v in vocab.items() if k != a}, a.upper() + "x": vocab[a]},
        "one token added": {**vocab, "<extra>": len(vocab)},
        "one token removed": {k: v for k, v in vocab.items() if k != b},
    }
    for what, other in changed.items():
        assert tokenizer_fingerprint(other, special) != fp, what
    assert tokenizer_fingerprint(vocab, {**special, "eos_token": "<|endoftext|>"}) != fp
    assert tokenizer_fingerprint(vocab, None) != fp


def test_config_errors_name_the_field(tmp_path, store):
    bad = write_cfg(tmp_path, store, optim={"lr": 0})
    with pytest.raises(ConfigError, match=r"train.yaml: optim.lr: Input should be greater than 0 \(got 0\)"):
        load_train(bad)
    bad = write_cfg(tmp_path, store, student={"init": "config", "tokenizer": TEACHER, "config": {"hidden_size": 8}})
    with pytest.raises(ConfigError, match="student.config.model_type is required"):
        load_train(bad)
    bad = write_cfg(tmp_path, store, loss={"kd_tail": "bucket", "temperature": 2.0})
    with pytest.raises(ConfigError, match="bucket needs temperature 1.0"):
        load_train(bad)
    bad = write_cfg(tmp_path, store, stepz=3)
    with pytest.raises(ConfigError, match="stepz: unknown field"):
        load_train(bad)


# --------------------------------------------------------------------------- resume, checkpoints


class Crash(Exception):
    pass


def test_killed_run_resumes_exactly(tmp_path, store):
    """12 steps uninterrupted vs. a run that dies at step 8 (checkpoint at 5) and resumes.

    Same data order (replayed stream), same weights/optimizer/RNG from the checkpoint, same
    ops on the same thread count: the losses agree bit for bit in practice. The tolerance
    (1e-6 relative) only leaves room for a BLAS that schedules a reduction differently."""
    full = train(load_train(write_cfg(tmp_path / "a", store)))

    cfg_b = load_train(write_cfg(tmp_path / "b", store))

    def die(stats):
        if stats.step == 8:
            raise Crash

    with pytest.raises(Crash):
        train(cfg_b, on_step=die)
    assert checkpoint.latest(cfg_b.output / "checkpoints").name == "step-000005"
    resumed = train(cfg_b, resume=True)
    assert resumed.resumed_from == 5 and [s.step for s in resumed.log] == list(range(6, 13))
    want = [s.loss for s in full.log[5:]]
    got = [s.loss for s in resumed.log]
    assert got == pytest.approx(want, rel=1e-6)
    assert any(s.kd is not None for s in resumed.log)
    # the log holds each step once, and the final students are the same
    steps = [json.loads(ln)["step"] for ln in (cfg_b.output / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    from safetensors.torch import load_file

    wa, wb = load_file(full.final_dir / "model.safetensors"), load_file(resumed.final_dir / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_truncated_checkpoint_is_refused(tmp_path, store, capsys):
    cfg = write_cfg(tmp_path, store, steps=5)
    assert main(["train", str(cfg), "-q"]) == 0
    state = tmp_path / "run" / "checkpoints" / "step-000005" / "state.pt"
    size = state.stat().st_size
    with open(state, "r+b") as f:
        f.truncate(size // 2)
    assert main(["train", str(cfg), "--resume", "-q"]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {state} is truncated ({size // 2} bytes, expected {size})" in err
    # a fresh start into the same output is refused too: it would mix two runs
    assert main(["train", str(cfg), "-q"]) == 1
    assert "already holds a training run" in capsys.readouterr().err


def test_resume_refuses_a_changed_config(tmp_path, store):
    train(load_train(write_cfg(tmp_path, store, steps=5)))
    changed = load_train(write_cfg(tmp_path, store, steps=8, loss={"kd_weight": 0.9}))
    with pytest.raises(checkpoint.CheckpointError, match="different train config"):
        train(changed, resume=True)
    longer = load_train(write_cfg(tmp_path, store, steps=7))  # more steps is fine
    assert train(longer, resume=True).steps == 7


# --------------------------------------------------------------------------- student inits


def test_pruned_student_keeps_every_kth_layer_and_embeddings():
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(student.resolve(TEACHER), dtype=torch.float32)
    pruned, _ = student.build(Student(init="prune", path=TEACHER, keep_every=10), seed=0)
    kept = [0, 10, 20, 29]
    assert pruned.config.num_hidden_layers == len(kept)
    assert torch.equal(pruned.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    for new, old in enumerate(kept):
        assert torch.equal(pruned.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight)
    assert torch.equal(pruned.model.norm.weight, teacher.model.norm.weight)


def test_lora_trains_adapters_only_and_saves_a_merged_model(tmp_path, store):
    from transformers import AutoModelForCausalLM

    cfg = load_train(write_cfg(tmp_path, store, steps=3, student={
        "init": "config", "tokenizer": TEACHER, "config": TINY, "lora": {"r": 4, "alpha": 8}}))
    t = Trainer(cfg)
    t.setup(resume=False)
    total, trainable = student.param_count(t.model)
    assert 0 < trainable < total / 50
    before = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    result = t.train()
    assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters() if not p.requires_grad)
    t.save(result)
    merged = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_resume_finishes(tmp_path, store):
    """A real `datagen train` process gets SIGTERM mid-run: it finishes the step, checkpoints
    it, exits 130; `--resume` then completes the run."""
    import signal
    import subprocess
    import sys
    import time

    cfg = write_cfg(tmp_path, store, steps=400, checkpoint_every=1000)
    log = tmp_path / "run" / "log.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "datagen", "train", str(cfg), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = json.loads(log.read_text().splitlines()[-1])["step"]
    assert 3 <= last < 400
    assert checkpoint.latest(tmp_path / "run" / "checkpoints").name == f"step-{last:06d}"
    assert "--resume" in err
    short = write_cfg(tmp_path, store, steps=last + 2, checkpoint_every=1000)
    assert main(["train", str(short), "--resume", "-q"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_selection_by_teacher_license_score_and_holdout(tmp_path, tok):
    from datagen.train.config import Data

    rows = []
    for i in range(30):
        r = make_row(tok, i)
        r["teacher"] = {**r["teacher"], "name": "a" if i % 2 else "b"}
        if i % 3 == 0:
            r["license"] = {**r["license"], "teacher": "LicenseRef-Unknown-Terms"}  # unknown: restricted
        r["verdicts"] = [{"filter": "judge", "keep": True, "reason": "ok", "score": i / 30, "details": None}]
        rows.append(r)
    src = make_store(tmp_path / "sel", rows)

    def ids(**kw):
        return {r["row_id"] for r in data.select_rows(Data(path=src, holdout_fraction=0.0, **kw), split="train")}

    by_id = {r["row_id"]: r for r in rows}
    assert ids() == set(by_id)
    assert ids(teachers=["a"]) == {k for k, r in by_id.items() if r["teacher"]["name"] == "a"}
    assert ids(license_class="permissive") == {k for k, r in by_id.items()
                                               if r["license"]["teacher"] == "Apache-2.0"}
    assert ids(min_score={"judge": 0.5}) == {k for k, r in by_id.items() if r["verdicts"][0]["score"] >= 0.5}
    assert ids(min_score={"other": 0.0}) == set()
    assert len(ids(max_rows=7)) == 7
    # the split is by prompt, disjoint, and covers every row
    d = Data(path=src, holdout_fraction=0.3)
    train_ids = {r["row_id"] for r in data.select_rows(d, split="train")}
    held_ids = {r["row_id"] for r in data.select_rows(d, split="heldout")}
    assert train_ids and held_ids and not train_ids & held_ids and train_ids | held_ids == set(by_id)


def test_final_answer_folds_json_and_text():
    from datagen.train.evaluate import final_answer

    assert final_answer('Sure! {"b": 1, "a": "x"}') == final_answer('```json\n{"a": "x", "b": 1}\n```')
    assert final_answer("Let me think.\nThe answer is: Yes.") == final_answer("the answer is yes")
    assert final_answer("") == ""


def test_eval_writes_a_report_for_each_student(tmp_path, store, capsys):
    cfg = write_cfg(tmp_path, store, steps=2, data={"path": str(store), "holdout_fraction": 0.3})
    assert main(["train", str(cfg), "-q"]) == 0
    ev = {"data": {"path": str(store), "holdout_fraction": 0.3}, "students": {"s": str(tmp_path / "run" / "final")},
          "max_rows": 3, "max_new_tokens": 4, "output": str(tmp_path / "eval.json"),
          "verifier": {"filters": ["nonempty", "format"], "answer": {"format": "json", "required": ["order_id"]}}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(ev))
    assert main(["eval", str(tmp_path / "eval.yaml"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "token_kl" in out and "perplexity" in out and "verifier_pass" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["rows"] == 3
    s = report["students"]["s"]
    assert s["token_kl"] > 0 and s["perplexity"] > 1 and 0 <= s["answer_agreement"] <= 1
    assert s["verifier_pass"] == 0.0  # 4 tokens cannot hold the required JSON
    assert report["teacher"]["verifier_pass"] == 1.0
    # a held-out fraction of 0 leaves nothing to score: a clear error
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump({**ev, "data": {"path": str(store), "holdout_fraction": 0.0}}))
    assert main(["eval", str(tmp_path / "eval.yaml"), "-q"]) == 1
    assert "no held-out rows" in capsys.readouterr().err
