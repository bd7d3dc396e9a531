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


def run_train(path: str, *, resume: bool, quiet: bool) -> int:
    from datagen.errors import EXIT_INTERRUPTED
    from datagen.train.config import load_train
    from datagen.train.trainer import Trainer

    cfg = load_train(path)
    err = Console(stderr=True, quiet=quiet)
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
