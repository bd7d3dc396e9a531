"""``datagen train`` with ``scaling.workers > 1``: the recipe on Ray Train's ``TorchTrainer``.

Ray Train starts ``workers`` processes (placement, ``torch.distributed`` process group:
gloo on CPU, NCCL on GPU), each running ``worker_loop``: the single-process recipe
(trainer.py) on its own data part (rank ``r`` of ``N`` reads row groups ``u % N == r``,
data.py), with DDP or FSDP from parallel.py.

Checkpoints go through Ray Train's API: at each ``checkpoint_every`` rank 0 writes the
usual ``state.pt`` + ``meta.json`` (checkpoint.py) into a staging folder and every rank
calls ``ray.train.report(..., checkpoint=...)``; Ray persists it to
``OUTPUT/checkpoints/step-NNNNNN`` (the run's storage is ``storage_path=OUTPUT``,
``name="checkpoints"``) and keeps the last ``keep_checkpoints``; rank 0 then rewrites
``OUTPUT/checkpoints/latest``, so the layout is the single-process one and ``--resume``
reads either. A worker that dies (killed, out of memory, a lost node) fails the group;
``FailureConfig(max_failures)`` restarts it and each worker resumes from
``ray.train.get_checkpoint()``: the result equals an uninterrupted run (tested).

The output folder must be reachable at the same path by every worker and the driver
(one machine, or shared storage such as NFS on a cluster). Not covered: an object-store
(``s3://``) output for training; elastic worker counts (the data split and the global
batch depend on ``workers``, so a resume needs the same number); Ctrl-C on the driver
stops the run without a last checkpoint (``--resume`` continues from the previous one).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

from datagen.errors import DatagenError, MissingExtra
from datagen.train.config import TrainConfig

RUN_NAME = "checkpoints"
# Fault injection for tests: "RANK:STEP" SIGKILLs that worker once, after that step.
KILL_ENV = "DATAGEN_TRAIN_KILL_AT"


def trainer_for(cfg: TrainConfig, *, resume: bool) -> Any:
    """The ``TorchTrainer`` for a config (nothing starts until ``fit()``)."""
    try:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError:
        raise MissingExtra("ray[default]", "cpu", "scaling.workers > 1") from None
    sc = cfg.scaling
    resources = dict(sc.resources_per_worker) or None
    return TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "resume": resume,
                           "kill_at": os.environ.get(KILL_ENV)},
        scaling_config=ScalingConfig(num_workers=sc.workers, use_gpu=sc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(cfg.output),
                             failure_config=FailureConfig(max_failures=sc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints)),
    )


def run(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train on Ray Train; the run's summary (``OUTPUT/train-result.json``)."""
    from datagen.train.trainer import RESULT, check_output

    check_output(cfg, resume=resume)
    cfg.output.mkdir(parents=True, exist_ok=True)
    try:
        trainer_for(cfg, resume=resume).fit()
    except DatagenError:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError wraps the worker's error
        raise DatagenError(f"training on Ray Train failed: {_cause(exc)}") from None
    return json.loads((cfg.output / RESULT).read_text())


def _cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:400]


def worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: set up (from Ray's last checkpoint, if any), train, save."""
    import ray.train
    import torch

    from datagen.train.parallel import Place
    from datagen.train.trainer import Trainer

    ctx = ray.train.get_context()
    cfg = TrainConfig.model_validate(config["cfg"])
    device = "cpu"
    if cfg.scaling.use_gpu:
        import ray.train.torch

        torch.cuda.set_device(ray.train.torch.get_device())
        device = "cuda"
    place = Place.worker(ctx.get_world_rank(), ctx.get_world_size(), cfg.scaling.strategy)
    t = Trainer(cfg, place=place, device=device, commit=_report_checkpoint(cfg))
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as folder:
            t.setup(resume=True, restored=Path(folder), check=False)
    else:
        t.setup(resume=config["resume"], check=False)
    result = t.train(on_step=_kill_hook(config.get("kill_at"), place.rank, cfg.output))
    t.save(result)


def _report_checkpoint(cfg: TrainConfig) -> Any:
    """A ``Trainer`` commit: stage on rank 0, hand to Ray (all ranks report), then point ``latest`` at it."""
    from datagen.storage.shards import atomic_write_text
    from datagen.train import checkpoint
    from datagen.train.trainer import config_hash

    ckdir = cfg.output / RUN_NAME
    digest = config_hash(cfg)

    def commit(step: int, state: dict[str, Any] | None) -> None:
        import ray.train

        name = f"step-{step:06d}"
        if state is None:
            ray.train.report({"step": step}, checkpoint=None, checkpoint_dir_name=name)
            return
        ckdir.mkdir(parents=True, exist_ok=True)
        for stale in ckdir.glob(".staging-*"):  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=ckdir))
        try:
            folder = checkpoint.save(staging, step=step, state=state, config_hash=digest, keep=1)
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if (ckdir / name / "state.pt").exists():
            atomic_write_text(ckdir / checkpoint.LATEST, name)

    return commit


def _kill_hook(kill_at: str | None, rank: int, output: Path) -> Any:
    if not kill_at:
        return None
    want_rank, want_step = (int(x) for x in kill_at.split(":"))
    marker = output / ".killed-once"

    def hook(stats: Any) -> None:
        if rank == want_rank and stats.step == want_step and not marker.exists():
            marker.write_text(f"rank {rank} killed after step {stats.step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
