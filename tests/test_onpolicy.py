"""``datagen onpolicy``: a round on real engines (the student and the embedded teacher in
vLLM on CPU, a local Ray), killed mid-way and resumed; and its refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, datagen

TEACHER = "embedded:smollm2-135m-instruct"
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024,
        "tie_word_embeddings": True}


def _student(dest: Path, *, extra_token: str | None = None) -> Path:
    """A random-init tiny Llama on the teacher's tokenizer (vLLM's CPU attention serves head size 32)."""
    from datagen.train import student
    from datagen.train.config import Student

    model, tok = student.build(Student(init="config", tokenizer=TEACHER, config=TINY), seed=0)
    if extra_token:
        tok.add_tokens([extra_token])
        model.resize_token_embeddings(len(tok))
    student.save_final(model, tok, dest)
    return dest


def _files(tmp_path: Path, student: Path, *, prompts: int) -> Path:
    job = {
        "name": "op-gen", "seed": 3,
        "prompts": {"template": str(REPO / "prompts" / "support_tickets.yaml"), "count": prompts},
        "teachers": [{"name": "smollm2", "backend": "vllm", "model": TEACHER, "batch_size": 4,
                      "sampling": {"temperature": 0.7, "max_tokens": 24, "logprobs": 5},
                      "engine": {"enforce_eager": True, "max_model_len": 512, "cpu_kvcache_gb": 1}}],
        "output": {"path": str(tmp_path / "gen"), "shard_rows": 4, "commit_every_s": 0.2},
        "runtime": {"num_cpus": 2},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    op = {
        "name": "op", "job": "job.yaml", "student": str(student), "rounds": 1, "holdout_fraction": 0.1,
        "sample": {"prompts": prompts, "max_tokens": 24, "batch_size": 4},
        "train": {"steps": 6, "batch_size": 4, "seq_len": 256, "checkpoint_every": 2, "device": "cpu",
                  "optim": {"lr": 3e-3, "warmup_steps": 0}},
        "output": "op",
    }
    path = tmp_path / "onpolicy.yaml"
    path.write_text(yaml.safe_dump(op, sort_keys=False))
    return path


def _ids(out: Path, streams=("accepted", "rejected", "failed")) -> list[str]:
    from datagen.storage.shards import ShardStore

    store = ShardStore.open(out)
    return [i for s in streams for i in store.read(s, columns=["row_id"]).column("row_id").to_pylist()]


def _committed(out: Path) -> int:
    try:
        return sum(s["rows"] for s in json.loads((out / "manifest.json").read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_a_round_killed_mid_way_resumes_with_the_same_row_ids(tmp_path):
    from datagen.config import load_job
    from datagen.onpolicy import load
    from datagen.onpolicy.rounds import sample_job
    from datagen.run import prepare

    prompts = 64
    path = _files(tmp_path, _student(tmp_path / "student0"), prompts=prompts)
    samples = tmp_path / "op" / "round-0" / "samples"
    proc = subprocess.Popen([sys.executable, "-m", "datagen", "onpolicy", str(path), "--quiet"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while _committed(samples) < 4:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the round made no progress"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and both engines: nothing tidied
        proc.wait()
    before = _ids(samples)
    assert not (tmp_path / "op" / "rounds.json").exists()

    res = datagen("onpolicy", str(path), timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]

    # the same ids an uninterrupted round commits: the sampling job's own request ids, once each
    cfg = load(path)
    job = load_job(cfg.job)
    stream, _ = prepare(sample_job(job, job.teachers[0], cfg.student, cfg, 0, samples))
    expected = {req.row_id for req in stream}
    after = _ids(samples)
    assert len(after) == len(set(after)) == prompts and set(after) == expected
    assert set(before) <= expected

    from datagen import records
    from datagen.storage.shards import ShardStore

    rows = list(ShardStore.open(samples).iter_rows("accepted"))
    assert rows and all(r["teacher"]["name"] == "student" and r["teacher"]["model"] == str(tmp_path / "student0")
                        for r in rows)
    lps = records.dequantize_logprobs(rows[0]["token_logprobs_q"])
    assert len(lps) == len(rows[0]["token_ids"]) and all(lp <= 0 for lp in lps)  # the student's log-prob per token

    scored = tmp_path / "op" / "round-0" / "scored"
    assert sorted(_ids(scored)) == sorted(_ids(samples, ("accepted",)))  # every sample scored, same ids
    srow = next(iter(ShardStore.open(scored).iter_rows("accepted")))
    assert srow["provenance"]["logprobs_by"].startswith("smollm2/vllm/")
    by_id = {r["row_id"]: r for r in rows}
    assert srow["token_ids"] == by_id[srow["row_id"]]["token_ids"]  # the teacher scored the student's tokens

    (entry,) = json.loads((tmp_path / "op" / "rounds.json").read_text())
    assert entry["student"] == str(tmp_path / "student0") and entry["train_steps"] == 6
    assert Path(entry["next_student"], "config.json").is_file()
    # six steps of reverse KL on these samples bring the student closer to the teacher on them
    assert entry["teacher_kl_after"] < entry["teacher_kl_before"]

    again = datagen("onpolicy", str(path))  # finished: nothing is redone
    assert again.returncode == 0 and json.loads((tmp_path / "op" / "rounds.json").read_text()) == [entry]


def test_a_student_with_another_tokenizer_is_refused_in_one_line(tmp_path):
    path = _files(tmp_path, _student(tmp_path / "other", extra_token="<zz_extra>"), prompts=8)
    res = datagen("onpolicy", str(path))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "tokenizer" in lines[0] and "not the teacher smollm2's" in lines[0], res.stderr
    assert not (tmp_path / "op" / "round-0").exists()


def test_an_api_teacher_cannot_score_and_says_so(tmp_path):
    path = _files(tmp_path, tmp_path / "none", prompts=8)
    job = yaml.safe_load((tmp_path / "job.yaml").read_text())
    job["teachers"] = [{"name": "api", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                        "license": "Apache-2.0"}]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    res = datagen("onpolicy", str(path))
    assert res.returncode == 1 and "self-hosted vLLM teacher" in res.stderr and len(res.stderr.splitlines()) == 1
