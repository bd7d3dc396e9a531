"""Training beyond one process: data parts, global-batch loss, gradient accumulation, and
Ray Train (2 CPU workers, gloo) with DDP, FSDP2 and a worker killed mid-run.

One local Ray for the module; the student is test_train's 2-layer Llama (~3M params) on
its 40-row store (5 row groups of 8 rows, so 2 workers read 3 and 2 of them). Each Ray run
starts two real worker processes (~20-40 s on 2 cores): the module keeps to four runs,
whose results later tests reuse.

Tolerances. A 2-worker step and a one-process step on the same global batch do the same
float32 arithmetic except the order of the gradient sums (gloo's all-reduce adds the two
ranks' gradients; one process accumulates micro-batch by micro-batch): losses agree to
1e-5 relative and weights to 1e-5 absolute after 6 AdamW steps at lr 1e-3 (an update is
at most ~lr per step, so order-of-summation noise stays far below that). A run restarted
from a checkpoint replays the same data and state through the same ops, so it is held to
the exact-resume tolerance of test_train (1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datagen.cli import main
from datagen.errors import ConfigError, DatagenError
from datagen.train import data, ray_train, student
from datagen.train.config import load_train
from datagen.train.parallel import Place
from datagen.train.trainer import Trainer, train
from tests.test_train import TEACHER, make_row, make_store, write_cfg

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parent.parent
STEPS = 6
SCALE = {"workers": 2, "strategy": "ddp", "max_failures": 1}


@pytest.fixture(scope="module")
def tok():
    return student.load_tokenizer(TEACHER)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tok):
    return make_store(tmp_path_factory.mktemp("store") / "out", [make_row(tok, i) for i in range(40)])


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def log_steps(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "log.jsonl").read_text().splitlines()]


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"largest weight difference {worst:.2e} (tolerance {atol:.0e})")
    assert worst <= atol, f"largest weight difference {worst:.2e} > {atol:.0e}"


def ray_cfg(tmp_path: Path, store: Path, **over):
    over = {"scaling": SCALE, "steps": STEPS, "checkpoint_every": 3, **over}
    return load_train(write_cfg(tmp_path, store, **over))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, store, ray_local):
    cfg = ray_cfg(tmp_path_factory.mktemp("ddp"), store)
    result = ray_train.run(cfg)
    return cfg, result


# --------------------------------------------------------------------------- without Ray


def test_parts_are_disjoint_and_their_union_is_the_selection(store, tmp_path):
    cfg = load_train(write_cfg(tmp_path, store))
    every = [r["row_id"] for r in data.select_rows(cfg.data, split="train")]
    for parts in (2, 3, 7):  # 5 row groups: 7 parts are dealt row by row
        seen = [[r["row_id"] for r in data.select_rows(cfg.data, split="train", part=p, parts=parts)]
                for p in range(parts)]
        assert all(seen), f"an empty part among {parts}"
        flat = [i for ids in seen for i in ids]
        assert len(flat) == len(set(flat)), "a row in two parts"
        assert set(flat) == set(every) and len(flat) == len(every)


def test_grad_accum_2_equals_doubling_the_batch(tmp_path, store):
    """batch 2 x accum 2 takes the very steps of batch 4: same packed rows, loss normalised
    by the tokens of the whole step (a mean of micro-batch means would differ)."""
    big = train(load_train(write_cfg(tmp_path / "big", store, steps=STEPS, batch_size=4)))
    acc = train(load_train(write_cfg(tmp_path / "acc", store, steps=STEPS, batch_size=2, grad_accum=2)))
    assert [s.tokens for s in acc.log] == [s.tokens for s in big.log]
    assert [s.loss for s in acc.log] == pytest.approx([s.loss for s in big.log], rel=1e-5)
    assert any(s.kd is not None for s in acc.log)
    assert_close(weights(tmp_path / "acc" / "run"), weights(tmp_path / "big" / "run"), atol=1e-5)


def test_scaling_config_errors_name_the_field(tmp_path, store, capsys):
    bad = {"fsdp with one worker": ({"scaling": {"workers": 1, "strategy": "fsdp"}}, "scaling.strategy: fsdp"),
           "max_rows with workers": ({"scaling": SCALE, "data": {"max_rows": 5}}, "data.max_rows"),
           "zero accumulation": ({"grad_accum": 0}, "grad_accum")}
    for what, (over, needle) in bad.items():
        path = write_cfg(tmp_path / what.replace(" ", "-"), store, **over)
        with pytest.raises(ConfigError) as err:
            load_train(path)
        assert needle in str(err.value), (what, str(err.value))


@pytest.mark.parametrize("name", ["train_2workers.yaml", "train_fsdp_gpu.yaml"])
def test_examples_check_without_a_gpu(name, capsys):
    """`datagen train FILE --check`: the file, the student's size (on the meta device) and
    Ray Train's scaling settings, with no data read and no GPU."""
    assert main(["train", str(REPO / "examples" / name), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {REPO / 'examples' / name}") and "params" in out
    cfg = load_train(REPO / "examples" / name)
    trainer = ray_train.trainer_for(cfg, resume=False)
    assert trainer.scaling_config.num_workers == cfg.scaling.workers


# --------------------------------------------------------------------------- on Ray Train


def test_two_workers_equal_one_process_on_the_same_global_batch(ddp_run, tmp_path, store):
    cfg, result = ddp_run
    assert result["workers"] == 2 and result["strategy"] == "ddp" and result["steps"] == STEPS
    ray_log = log_steps(cfg.output)
    assert [s["step"] for s in ray_log] == list(range(1, STEPS + 1))
    # One process reading both data parts sees the same global batch the two workers did.
    ref_cfg = load_train(write_cfg(tmp_path, store, steps=STEPS, checkpoint_every=3))
    t = Trainer(ref_cfg, place=Place(parts=(0, 1), num_parts=2))
    t.setup(resume=False)
    ref = t.train()
    t.save(ref)
    assert [s["tokens"] for s in ray_log] == [s.tokens for s in ref.log]
    assert [s["loss"] for s in ray_log] == pytest.approx([s.loss for s in ref.log], rel=1e-5)
    assert [s["kd"] for s in ray_log] == pytest.approx([s.kd for s in ref.log], rel=1e-5)
    assert_close(weights(cfg.output), weights(tmp_path / "run"), atol=1e-5)
    # Ray's checkpoints sit in the single-process layout, `latest` naming the last one
    ckdir = cfg.output / "checkpoints"
    assert (ckdir / "latest").read_text() == f"step-{STEPS:06d}"
    assert sorted(p.name for p in ckdir.glob("step-*")) == ["step-000003", "step-000006"]


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(ddp_run, tmp_path, store, monkeypatch):
    """Rank 1 is SIGKILLed after step 4; Ray Train's FailureConfig restarts the group,
    which resumes from step 3 and finishes with the uninterrupted run's weights."""
    cfg_full, _ = ddp_run
    cfg = ray_cfg(tmp_path, store)
    monkeypatch.setenv(ray_train.KILL_ENV, "1:4")
    result = ray_train.run(cfg)
    assert (cfg.output / ".killed-once").read_text().startswith("rank 1 killed after step 4")
    assert result["steps"] == STEPS
    assert [s["step"] for s in log_steps(cfg.output)] == list(range(1, STEPS + 1))  # steps 4.. redone once
    assert [s["loss"] for s in log_steps(cfg.output)] == \
        pytest.approx([s["loss"] for s in log_steps(cfg_full.output)], rel=1e-6)
    assert_close(weights(cfg.output), weights(cfg_full.output), atol=1e-6)


def test_without_failures_allowed_a_kill_fails_the_run_and_resume_finishes_it(ddp_run, tmp_path, store,
                                                                               monkeypatch):
    """max_failures: 0: rank 0 killed after step 4 fails the run with one line, the step-3
    checkpoint stays; `--resume` (a new Ray Train run on the same output) finishes it with
    the uninterrupted run's weights."""
    cfg_full, _ = ddp_run
    cfg = ray_cfg(tmp_path, store, scaling={**SCALE, "max_failures": 0})
    monkeypatch.setenv(ray_train.KILL_ENV, "0:4")
    with pytest.raises(DatagenError) as err:
        ray_train.run(cfg)
    assert str(err.value).startswith("training on Ray Train failed") and "\n" not in str(err.value)
    assert (cfg.output / "checkpoints" / "latest").read_text() == "step-000003"
    assert not (cfg.output / "final").exists()
    with pytest.raises(DatagenError, match="already holds a training run"):
        ray_train.run(cfg)
    monkeypatch.delenv(ray_train.KILL_ENV)
    result = ray_train.run(cfg, resume=True)
    assert result["steps"] == STEPS
    assert [s["step"] for s in log_steps(cfg.output)] == list(range(1, STEPS + 1))
    assert_close(weights(cfg.output), weights(cfg_full.output), atol=1e-6)


def test_fsdp_on_cpu_matches_ddp(ddp_run, tmp_path, store):
    """FSDP2 (fully_shard per decoder layer) with gloo: same steps as DDP, within the
    cross-process tolerance (its reduce-scatter sums in another order)."""
    cfg_ddp, _ = ddp_run
    cfg = ray_cfg(tmp_path, store, scaling={**SCALE, "strategy": "fsdp"})
    result = ray_train.run(cfg)
    assert result["strategy"] == "fsdp" and result["params"] == json.loads(
        (cfg_ddp.output / "train-result.json").read_text())["params"]
    assert [s["loss"] for s in log_steps(cfg.output)] == \
        pytest.approx([s["loss"] for s in log_steps(cfg_ddp.output)], rel=1e-5)
    assert_close(weights(cfg.output), weights(cfg_ddp.output), atol=1e-5)


# --------------------------------------------------------------------------- datagen submit


def test_submit_builds_a_training_job(tmp_path, store):
    """A train file goes to the cluster like a job file: `datagen train FILE` as the entrypoint,
    the folder as working_dir; its data and output must be shared storage, not the upload."""
    from datagen.submit import build

    proj = tmp_path / "proj"
    cfg = write_cfg(proj, store, scaling=SCALE, output=str(tmp_path / "shared" / "student"))
    sub = build(cfg, working_dir=proj, python="/opt/py/bin/python", env=["OMP_NUM_THREADS=1"])
    assert sub.entrypoint == "/opt/py/bin/python -m datagen train train.yaml --quiet"
    assert sub.runtime_env["working_dir"] == str(proj.resolve())
    assert sub.runtime_env["env_vars"] == {"OMP_NUM_THREADS": "1", "DATAGEN_SECRET_ENV": ""}
    assert sub.metadata["datagen_kind"] == "train" and sub.metadata["datagen_output"] == str(tmp_path / "shared" / "student")
    again = build(cfg, working_dir=proj, python="python", resume=True)
    assert again.entrypoint == "python -m datagen train train.yaml --quiet --resume"
    inside = write_cfg(tmp_path / "proj2", store, output="out/student")
    with pytest.raises(Exception, match="output .* is inside the uploaded working directory"):
        build(inside, working_dir=tmp_path / "proj2")
    with pytest.raises(Exception, match="--output applies to generation jobs"):
        build(cfg, working_dir=proj, output=str(tmp_path / "x"))


@pytest.mark.slow
def test_submit_runs_a_two_worker_training_job_on_a_ray_cluster(tmp_path, store):
    """`datagen submit TRAIN.yaml --follow` against a real Ray head (job server, token auth):
    the job's driver starts Ray Train's workers on that cluster and the student lands in the
    shared output; `datagen jobs logs` shows the training entrypoint."""
    import sys

    from datagen.testing.ray_head import LocalRayHead

    from .conftest import datagen

    proj = tmp_path / "proj"
    out = tmp_path / "shared" / "student"
    cfg = write_cfg(proj, store, scaling=SCALE, steps=3, checkpoint_every=3, output=str(out))
    with LocalRayHead(num_cpus=2) as head:
        env = {**head.client_env, "PYTHONPATH": str(REPO)}  # this checkout's datagen, here and in the job
        res = datagen("submit", str(cfg), "--address", head.address, "--follow", "--python", sys.executable,
                      "--env", f"PYTHONPATH={REPO}", env=env, cwd=proj, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        job_id = res.stdout.splitlines()[0]
        assert job_id.startswith("datagen-train-t-") and f"job {job_id}: SUCCEEDED" in res.stderr
        logs = datagen("jobs", "logs", job_id, "--address", head.address, env=env)
        assert "datagen train train.yaml" in logs.stdout
    result = json.loads((out / "train-result.json").read_text())
    assert result["workers"] == 2 and result["steps"] == 3
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "checkpoints" / "latest").read_text() == "step-000003"
