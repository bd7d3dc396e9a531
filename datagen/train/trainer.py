"""The training recipe, top to bottom: setup -> train -> save.

One optimizer step = one *global batch*: ``grad_accum`` micro-batches of ``batch_size``
packed rows of ``seq_len`` tokens on each of ``scaling.workers`` processes:

    loss = (1 - kd_weight) * CE(student, teacher tokens)
           + kd_weight * T^2 * KL(teacher top-k || student)       (datagen/train/losses.py)

where CE and KL are per-token means over the *whole global batch*: each micro-batch adds
``sum of its token losses / tokens of the global batch`` (the counts are summed over the
processes before the first backward), so the step is the one a single process would take
on the same rows, whatever their split into micro-batches and workers (tested).

The same recipe runs in one process (``workers: 1``, ``datagen train``) and in each Ray
Train worker (datagen/train/ray_train.py); datagen/train/parallel.py holds what differs
(DDP / FSDP wrapping, sums across processes, whole-model state).

Only positions that carry a target reach the LM head (``logits_to_keep``): with chat
prompts much longer than answers, most of a packed row is prompt, and a full
``[tokens, vocab]`` logit tensor would dominate time and memory.

Devices: CPU trains in float32; CUDA keeps float32 master weights and runs the forward in
bf16 autocast. The same config runs on either (``device: auto``).

Resume is exact: a checkpoint holds model, optimizer, scheduler and RNG states, and the
batch stream is replayed from its seed up to the checkpoint's step (datagen/train/data.py).
A run that dies between checkpoints loses the steps since the last one, and redoes them
identically; Ctrl-C / SIGTERM (through the CLI, one process) finish the current step and
checkpoint it. Not covered: pipeline or tensor parallelism; per-rank RNG streams (every
rank restores rank 0's, which is exact while ranks draw alike, as without dropout).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen import records
from datagen.errors import DatagenError
from datagen.storage.shards import atomic_write_text
from datagen.train import checkpoint, data, losses, parallel, student
from datagen.train.config import TrainConfig
from datagen.train.parallel import Place

LOG = "log.jsonl"
RESULT = "train-result.json"


@dataclass
class StepStats:
    step: int
    loss: float
    ce: float
    kd: float | None
    lr: float
    tokens: int


@dataclass
class TrainResult:
    steps: int
    final_dir: Path
    log: list[StepStats] = field(default_factory=list)
    tokens_per_s: float = 0.0
    resumed_from: int | None = None
    interrupted: bool = False


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DatagenError("device: cuda, but torch sees no CUDA device")
    return name


def config_hash(cfg: TrainConfig) -> str:
    """What a checkpoint must agree with to be resumed. Run length and device may change: a
    longer ``steps`` extends the run (the cosine schedule then stretches to the new length,
    so only a resume with the same ``steps`` is exact)."""
    dump = cfg.model_dump(mode="json", exclude={"steps", "checkpoint_every", "keep_checkpoints", "device"})
    # How many workers read the data and what sharding holds the state change the run;
    # where they run does not. Defaults are left out, so runs from before these fields resume.
    sc = dump.pop("scaling")
    if dump["grad_accum"] == 1:
        del dump["grad_accum"]
    if sc["workers"] > 1:
        dump["scaling"] = {"workers": sc["workers"], "strategy": sc["strategy"]}
    return records.content_hash(dump)


def forward_losses(model: Any, batch: dict[str, Any], *, device: str, temperature: float = 1.0,
                   tail: str = "renormalize", use_kd: bool = True,
                   divergence: str = "forward") -> tuple[Any, Any, int]:
    """(per-target CE ``[N]``, per-KD-position KL ``[M]`` or None, tokens) for one batch.
    Shared by the trainer and ``datagen eval``."""
    import torch

    targets = batch["targets"].to(device)
    keep = (targets != data.IGNORE).any(0).nonzero().squeeze(-1)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        out = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                    logits_to_keep=keep, use_cache=False)
    tgt = targets[:, keep]
    sel = tgt != data.IGNORE
    logits = out.logits[sel]  # [N, V]
    ce = losses.ce_loss(logits, tgt[sel])
    kd = None
    if use_kd:
        mask = batch["top_mask"].to(device)[:, keep][sel]  # [N, K]
        has = mask.any(-1)
        if has.any():
            top = (batch["top_ids"].to(device)[:, keep][sel][has], batch["top_logprobs"].to(device)[:, keep][sel][has],
                   mask[has])
            kd = (losses.reverse_kl_loss(logits[has], *top) if divergence == "reverse"
                  else losses.kd_loss(logits[has], *top, temperature=temperature, tail=tail))
    return ce, kd, int(batch["tokens"])


def _schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    warm, total = cfg.optim.warmup_steps, cfg.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def check_output(cfg: TrainConfig, *, resume: bool) -> None:
    """A new run needs an empty output; a resume needs a checkpoint there."""
    out = cfg.output
    prior = checkpoint.latest(out / "checkpoints")
    if resume and prior is None:
        raise DatagenError(f"{out}: no checkpoint to resume from (run without --resume to start)")
    if not resume and (prior is not None or (out / LOG).exists()):
        raise DatagenError(f"{out} already holds a training run; `datagen train FILE --resume` "
                           "continues it, or choose another output")


Commit = Callable[[int, "dict[str, Any] | None"], None]


class Trainer:
    """The recipe for one process. ``place``: this process's rank and data parts (one
    process by default); ``device``: forced (a Ray worker's), else ``cfg.device``;
    ``commit(step, state)``: stores a checkpoint (``state`` is None off rank 0; every rank
    calls it), by default atomically under ``OUTPUT/checkpoints``."""

    def __init__(self, cfg: TrainConfig, *, place: Place | None = None, device: str | None = None,
                 commit: Commit | None = None):
        self.cfg = cfg
        self.place = place or Place()
        self.forced_device = device
        self.out = cfg.output
        self.ckdir = cfg.output / "checkpoints"
        self.commit = commit or self._commit_local
        self.stop_requested = False  # set by the CLI's SIGINT/SIGTERM handler; checked between steps

    # -- setup ---------------------------------------------------------------------
    def setup(self, *, resume: bool, restored: Path | None = None, check: bool = True) -> None:
        """``restored``: a checkpoint folder to start from (Ray Train's, after a restart);
        ``check``: refuse an output that does not match ``resume`` (the driver checks it
        once when several processes share an output)."""
        import torch

        cfg, place = self.cfg, self.place
        self.device = self.forced_device or pick_device(cfg.device)
        self.hash = config_hash(cfg)
        if check:
            check_output(cfg, resume=resume)
        prior = restored or (checkpoint.latest(self.ckdir) if resume else None)
        torch.manual_seed(cfg.seed)
        model, self.tok = student.build(cfg.student, seed=cfg.seed)
        model.to(self.device)
        self.model = parallel.wrap(model, place, self.device)
        self.fingerprint = student.fingerprint(self.tok)
        self.use_kd = cfg.loss.kd_weight > 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                     weight_decay=cfg.optim.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(cfg))
        self.step = 0
        if prior is not None:
            state = checkpoint.load(prior, config_hash=self.hash)
            parallel.load_full_state(self.model, self.opt, state["model"], state["optimizer"], place)
            self.sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            if self.device == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"])
            self.step = state["step"]
        if place.is_main:
            self._truncate_log(self.step)  # a restarted run redoes the steps after its checkpoint
        self.encoder = data.Encoder(self.tok, fingerprint=self.fingerprint, use_kd=self.use_kd, seq_len=cfg.seq_len)
        self.k = data.kd_width(cfg.data) if self.use_kd else 1
        # Exact resume: replay each deterministic stream past the micro-batches already trained on.
        done = self.step * cfg.grad_accum
        self.streams = [itertools.islice(data.batches(
            cfg.data, self.encoder, batch_size=cfg.batch_size, seq_len=cfg.seq_len, pad_id=self.tok.pad_token_id,
            buffer=cfg.shuffle_buffer, seed=cfg.seed, k=self.k, part=part, parts=place.num_parts), done, None)
            for part in place.parts]

    def _truncate_log(self, step: int) -> None:
        path = self.out / LOG
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))

    def next_micro_batches(self) -> list[dict[str, Any]]:
        """This process's share of the next global batch: ``grad_accum`` micro-batches of
        each of its data parts."""
        return [next(s) for _ in range(self.cfg.grad_accum) for s in self.streams]

    # -- train ---------------------------------------------------------------------
    def train_step(self, micro: list[dict[str, Any]]) -> StepStats:
        import torch

        cfg, place = self.cfg, self.place
        self.model.train()
        # The global batch's token counts first: they normalise every micro-batch's loss.
        n_ce = n_kd = tokens = 0
        for b in micro:
            target = b["targets"] != data.IGNORE
            n_ce += int(target.sum())
            n_kd += int((target & b["top_mask"].any(-1)).sum()) if self.use_kd else 0
            tokens += int(b["tokens"])
        n_ce, n_kd, tokens = parallel.all_sum([n_ce, n_kd, tokens], place, self.device)
        has_kd = self.use_kd and n_kd > 0
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # CE, KL over this process's tokens
        self.opt.zero_grad(set_to_none=True)
        for i, batch in enumerate(micro):
            with parallel.grad_sync(self.model, place, sync=i == len(micro) - 1):
                ce, kd, _ = forward_losses(self.model, batch, device=self.device, temperature=cfg.loss.temperature,
                                           tail=cfg.loss.kd_tail, use_kd=self.use_kd,
                                           divergence=cfg.loss.divergence)
                kd_sum = kd.sum() if kd is not None else ce.new_zeros(())
                loss = losses.mix(ce.sum() / max(n_ce, 1), kd_sum / n_kd if has_kd else None,
                                  kd_weight=cfg.loss.kd_weight, temperature=cfg.loss.temperature)
                # DDP and FSDP average gradients over processes; the loss is a sum over them.
                (loss * place.world).backward()
            sums += torch.stack([ce.sum().detach().double(), kd_sum.detach().double()])
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.step += 1
        ce_sum, kd_sum = parallel.all_sum(sums.tolist(), place, self.device)
        ce_mean = ce_sum / max(n_ce, 1)
        kd_mean = kd_sum / n_kd if has_kd else None
        total = ce_mean if kd_mean is None or cfg.loss.kd_weight == 0 else \
            (1 - cfg.loss.kd_weight) * ce_mean + cfg.loss.kd_weight * cfg.loss.temperature ** 2 * kd_mean
        return StepStats(self.step, total, ce_mean, kd_mean, lr, int(tokens))

    def save_checkpoint(self) -> None:
        """Every process calls it (gathering the state is a collective under fsdp)."""
        import torch

        model_state, opt_state = parallel.full_state(self.model, self.opt, self.place)
        state = None
        if self.place.is_main:
            state = {
                "step": self.step,
                "model": model_state,
                "optimizer": opt_state,
                "scheduler": self.sched.state_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state() if self.device == "cuda" else None},
            }
        self.commit(self.step, state)

    def _commit_local(self, step: int, state: dict[str, Any] | None) -> None:
        if state is not None:
            checkpoint.save(self.ckdir, step=step, state=state, config_hash=self.hash,
                            keep=self.cfg.keep_checkpoints)
        parallel.barrier(self.place)

    def train(self, *, progress: Any = None, on_step: Callable[[StepStats], None] | None = None) -> TrainResult:
        cfg, main = self.cfg, self.place.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        result = TrainResult(steps=self.step, final_dir=self.out / "final",
                             resumed_from=self.step or None)
        start, tokens = time.perf_counter(), 0
        with open(self.out / LOG, "a") if main else contextlib.nullcontext() as log:
            while self.step < cfg.steps:
                stats = self.train_step(self.next_micro_batches())
                tokens += stats.tokens
                result.log.append(stats)
                if main:
                    log.write(json.dumps(stats.__dict__) + "\n")
                    log.flush()
                if progress is not None and main:
                    progress(stats, tokens / (time.perf_counter() - start))
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps or self.stop_requested:
                    self.save_checkpoint()
                if on_step is not None:
                    on_step(stats)
                if self.stop_requested and self.step < cfg.steps:
                    result.interrupted = True
                    break
        elapsed = time.perf_counter() - start
        result.steps = self.step
        result.tokens_per_s = tokens / elapsed if elapsed > 0 else 0.0
        return result

    # -- save ----------------------------------------------------------------------
    def save(self, result: TrainResult) -> None:
        """The student as an HF folder, and the run's summary (rank 0 writes; every process calls)."""
        weights = parallel.full_model_state(self.model, self.place)
        if self.place.is_main:
            model = parallel.unwrap(self.model)
            if self.place.distributed and self.place.strategy == "fsdp":
                model, _ = student.build(self.cfg.student, seed=self.cfg.seed)  # a plain copy to save
                model.load_state_dict(weights)
            student.save_final(model, self.tok, result.final_dir)
            total, trainable = student.param_count(model)
            last = result.log[-1] if result.log else None
            atomic_write_text(self.out / RESULT, json.dumps({
                "name": self.cfg.name, "steps": result.steps, "params": total, "trainable_params": trainable,
                "tokenizer_fingerprint": self.fingerprint, "device": self.device,
                "workers": self.place.world, "strategy": self.place.strategy if self.place.distributed else None,
                "final_loss": last.loss if last else None, "tokens_per_s": round(result.tokens_per_s, 1),
                "skipped_rows_too_long": self.encoder.skipped, "final": str(result.final_dir),
                "config": self.cfg.model_dump(mode="json"),
            }, indent=1))
        parallel.barrier(self.place)


def train(cfg: TrainConfig, *, resume: bool = False, progress: Any = None,
          on_step: Callable[[StepStats], None] | None = None) -> TrainResult:
    """Set up, train to ``cfg.steps``, save the student to ``OUTPUT/final``."""
    t = Trainer(cfg)
    t.setup(resume=resume)
    result = t.train(progress=progress, on_step=on_step)
    t.save(result)
    return result
