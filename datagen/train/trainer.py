"""The training recipe, top to bottom: setup -> train -> save.

One optimizer step = one batch of ``batch_size`` packed rows of ``seq_len`` tokens:

    loss = (1 - kd_weight) * CE(student, teacher tokens)
           + kd_weight * T^2 * KL(teacher top-k || student)       (datagen/train/losses.py)

Only positions that carry a target reach the LM head (``logits_to_keep``): with chat
prompts much longer than answers, most of a packed row is prompt, and a full
``[tokens, vocab]`` logit tensor would dominate time and memory.

Devices: CPU trains in float32; CUDA keeps float32 master weights and runs the forward in
bf16 autocast. The same config runs on either (``device: auto``).

Resume is exact: a checkpoint holds model, optimizer, scheduler and RNG states, and the
batch stream is replayed from its seed up to the checkpoint's step (datagen/train/data.py).
A run that dies between checkpoints loses the steps since the last one, and redoes them
identically; Ctrl-C / SIGTERM (through the CLI) finish the current step and checkpoint it. Not covered: multi-GPU (one device per run), gradient accumulation.
"""

from __future__ import annotations

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
from datagen.train import checkpoint, data, losses, student
from datagen.train.config import TrainConfig

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
    return records.content_hash(cfg.model_dump(mode="json", exclude={"steps", "checkpoint_every",
                                                                      "keep_checkpoints", "device"}))


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


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = cfg.output
        self.ckdir = cfg.output / "checkpoints"
        self.stop_requested = False  # set by the CLI's SIGINT/SIGTERM handler; checked between steps

    # -- setup ---------------------------------------------------------------------
    def setup(self, *, resume: bool) -> None:
        import torch

        cfg = self.cfg
        self.device = pick_device(cfg.device)
        self.hash = config_hash(cfg)
        prior = checkpoint.latest(self.ckdir)
        if resume and prior is None:
            raise DatagenError(f"{self.out}: no checkpoint to resume from (run without --resume to start)")
        if not resume and (prior is not None or (self.out / LOG).exists()):
            raise DatagenError(f"{self.out} already holds a training run; `datagen train FILE --resume` "
                               "continues it, or choose another output")
        torch.manual_seed(cfg.seed)
        self.model, self.tok = student.build(cfg.student, seed=cfg.seed)
        self.model.to(self.device)
        self.fingerprint = student.fingerprint(self.tok)
        self.use_kd = cfg.loss.kd_weight > 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                     weight_decay=cfg.optim.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(cfg))
        self.step = 0
        if resume:
            state = checkpoint.load(prior, config_hash=self.hash)
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            if self.device == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"])
            self.step = state["step"]
            self._truncate_log(self.step)
        self.encoder = data.Encoder(self.tok, fingerprint=self.fingerprint, use_kd=self.use_kd, seq_len=cfg.seq_len)
        self.k = data.kd_width(cfg.data) if self.use_kd else 1
        stream = data.batches(cfg.data, self.encoder, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                              pad_id=self.tok.pad_token_id, buffer=cfg.shuffle_buffer, seed=cfg.seed, k=self.k)
        # Exact resume: replay the deterministic stream past the batches already trained on.
        self.batches = itertools.islice(stream, self.step, None)

    def _truncate_log(self, step: int) -> None:
        path = self.out / LOG
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))

    # -- train ---------------------------------------------------------------------
    def train_step(self, batch: dict[str, Any]) -> StepStats:
        import torch

        cfg = self.cfg
        self.model.train()
        ce, kd, tokens = forward_losses(self.model, batch, device=self.device, temperature=cfg.loss.temperature,
                                        tail=cfg.loss.kd_tail, use_kd=self.use_kd,
                                        divergence=cfg.loss.divergence)
        ce_mean = ce.mean()
        kd_mean = kd.mean() if kd is not None else None
        loss = losses.mix(ce_mean, kd_mean, kd_weight=cfg.loss.kd_weight, temperature=cfg.loss.temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.step += 1
        return StepStats(self.step, loss.item(), ce_mean.item(), kd_mean.item() if kd_mean is not None else None,
                         lr, tokens)

    def save_checkpoint(self) -> None:
        import torch

        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if self.device == "cuda" else None},
        }
        checkpoint.save(self.ckdir, step=self.step, state=state, config_hash=self.hash,
                        keep=self.cfg.keep_checkpoints)

    def train(self, *, progress: Any = None, on_step: Callable[[StepStats], None] | None = None) -> TrainResult:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        result = TrainResult(steps=self.step, final_dir=self.out / "final",
                             resumed_from=self.step or None)
        start, tokens = time.perf_counter(), 0
        with open(self.out / LOG, "a") as log:
            while self.step < cfg.steps:
                stats = self.train_step(next(self.batches))
                tokens += stats.tokens
                result.log.append(stats)
                log.write(json.dumps(stats.__dict__) + "\n")
                log.flush()
                if progress is not None:
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
        student.save_final(self.model, self.tok, result.final_dir)
        total, trainable = student.param_count(self.model)
        last = result.log[-1] if result.log else None
        atomic_write_text(self.out / RESULT, json.dumps({
            "name": self.cfg.name, "steps": result.steps, "params": total, "trainable_params": trainable,
            "tokenizer_fingerprint": self.fingerprint, "device": self.device,
            "final_loss": last.loss if last else None, "tokens_per_s": round(result.tokens_per_s, 1),
            "skipped_rows_too_long": self.encoder.skipped, "final": str(result.final_dir),
            "config": self.cfg.model_dump(mode="json"),
        }, indent=1))


def train(cfg: TrainConfig, *, resume: bool = False, progress: Any = None,
          on_step: Callable[[StepStats], None] | None = None) -> TrainResult:
    """Set up, train to ``cfg.steps``, save the student to ``OUTPUT/final``."""
    t = Trainer(cfg)
    t.setup(resume=resume)
    result = t.train(progress=progress, on_step=on_step)
    t.save(result)
    return result
