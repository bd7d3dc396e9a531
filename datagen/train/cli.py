"""What ``datagen train`` and ``datagen eval`` do at the terminal: progress bar, summary lines.

Kept apart from ``datagen/cli.py`` so that file only gains two small sub-commands.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    """A rich bar: step m/n, loss, tokens/s, elapsed, ETA."""

    def __init__(self, console: Console, label: str, *, total: int, done: int):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task(label, total=total, completed=done, detail="loading…")

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, stats: Any, tokens_per_s: float) -> None:
        kd = f" kd {stats.kd:.3f}" if stats.kd is not None else ""
        self.progress.update(self.task, completed=stats.step,
                             detail=f"loss {stats.loss:.3f} (ce {stats.ce:.3f}{kd}) · {tokens_per_s:,.0f} tok/s")


def run_train(path: str, *, resume: bool, quiet: bool, check: bool = False) -> int:
    from datagen.errors import EXIT_INTERRUPTED
    from datagen.train.config import load_train
    from datagen.train.trainer import Trainer

    cfg = load_train(path)
    if check:
        return _check(path, cfg)
    err = Console(stderr=True, quiet=quiet)
    if cfg.scaling.workers > 1:
        return _run_on_ray(cfg, resume=resume, err=err)
    t = Trainer(cfg)
    t.setup(resume=resume)
    total, trainable = _params(t.model)
    err.print(f"student: {total / 1e6:.2f}M params ({trainable / 1e6:.2f}M trainable) on {t.device}; "
              f"{'KD + CE' if t.use_kd else 'CE only (SFT)'}; " +
              (f"resuming at step {t.step}" if resume else "from step 0"), highlight=False)
    with _stop_on_signal(t), TrainProgress(err, cfg.name, total=cfg.steps, done=t.step) as progress:
        result = t.train(progress=progress)
    if result.interrupted:
        Console(stderr=True).print(f"interrupted at step {result.steps}: checkpoint saved; "
                                   f"`datagen train {path} --resume` continues", style="yellow", highlight=False)
        return EXIT_INTERRUPTED
    t.save(result)
    print(f"trained {result.steps} steps ({result.tokens_per_s:,.0f} tok/s); student: {result.final_dir}; "
          f"checkpoints: {t.ckdir}")
    return 0


def _check(path: str, cfg: Any) -> int:
    """What can be checked without data or a GPU: the student's size (built on the meta
    device, no memory), the training state per worker, Ray Train's scaling settings."""
    params = _meta_params(cfg.student)
    sc = cfg.scaling
    state_gb = params * 16 / 1e9  # fp32 weights + grads + AdamW's two moments
    per_worker = state_gb / sc.workers if sc.strategy == "fsdp" else state_gb
    if sc.workers > 1:
        from datagen.train import ray_train

        ray_train.trainer_for(cfg, resume=False)  # Ray's own checks of the scaling settings
    print(f"ok: {path}: student {params / 1e6:,.1f}M params; {sc.workers} worker(s), {sc.strategy}, "
          f"{'GPU' if sc.use_gpu else cfg.device}; global batch {cfg.batch_size * cfg.grad_accum * sc.workers} x "
          f"{cfg.seq_len} tokens; training state ~{per_worker:,.1f} GB per worker (+ activations); "
          f"data {cfg.data.path}; output {cfg.output}")
    return 0


def _meta_params(st: Any) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from datagen.train import student

    if st.init == "config":
        fields = dict(st.config)
        tok = student.load_tokenizer(st.tokenizer or st.path)
        fields.setdefault("vocab_size", len(tok))
        conf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        conf = AutoConfig.from_pretrained(student.resolve(st.path))
        if st.init == "prune":
            n = conf.num_hidden_layers
            conf.num_hidden_layers = len(set(range(0, n, st.keep_every)) | {n - 1})
            if isinstance(getattr(conf, "layer_types", None), list):
                conf.layer_types = conf.layer_types[:conf.num_hidden_layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    return sum(p.numel() for p in model.parameters())


def _run_on_ray(cfg: Any, *, resume: bool, err: Console) -> int:
    from datagen.train import ray_train

    sc = cfg.scaling
    err.print(f"Ray Train: {sc.workers} workers ({sc.strategy}, {'GPU' if sc.use_gpu else 'CPU'}), global batch "
              f"{cfg.batch_size} x {cfg.grad_accum} x {sc.workers} packed rows; " +
              ("resuming" if resume else "from step 0"), highlight=False)
    res = ray_train.run(cfg, resume=resume)
    print(f"trained {res['steps']} steps on {res['workers']} workers ({res['tokens_per_s']:,.0f} tok/s); "
          f"student: {res['final']}; checkpoints: {cfg.output / ray_train.RUN_NAME}")
    return 0


@contextmanager
def _stop_on_signal(trainer: Any) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 130. A second one stops at once."""
    def handler(signum: int, frame: Any) -> None:
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _params(model: Any) -> tuple[int, int]:
    from datagen.train.student import param_count

    return param_count(model)


def run_eval(path: str, *, quiet: bool) -> int:
    from datagen.train.config import load_eval
    from datagen.train.evaluate import evaluate, table

    cfg = load_eval(path)
    report = evaluate(cfg, console=Console(stderr=True, quiet=quiet))
    Console().print(table(report))
    print(f"report: {Path(cfg.output)}")
    return 0
