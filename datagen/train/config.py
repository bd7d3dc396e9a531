"""Train and eval files: pydantic v2 models loaded from YAML, validated like job files.

Relative paths resolve against the file's folder, so ``datagen train examples/train.yaml``
works from any directory. Errors name the field and the value, e.g.
``train.yaml: optim.lr: Input should be greater than 0 (got 0.0)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from datagen.validation import Strict, read_model
from datagen.prompts import AnswerFormat


class Data(Strict):
    """Which committed rows to read. Accepted rows only; the manifest decides what exists."""

    path: Path = Field(description="a datagen output directory (or export / dedupe view)")
    license_class: Literal["permissive", "conditional", "restricted"] | None = Field(
        None, description="keep rows whose strictest term is at most this class")
    teachers: list[str] = Field(default_factory=list, description="keep rows from these teacher names")
    min_score: dict[str, float] = Field(
        default_factory=dict, description="filter name -> lowest verdict score kept (rows without one are dropped)")
    holdout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="prompts held out for eval, chosen by a hash of prompt_id (train and eval agree)")
    max_rows: int | None = Field(None, ge=1, description="stop reading after this many selected rows")


class Lora(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


class Student(Strict):
    """Where the student's weights come from.

    - ``pretrained``: ``path`` is a local HF folder (or ``embedded:NAME``);
    - ``config``: random init from ``config`` (HF config fields, ``model_type`` required),
      tokenizer from ``tokenizer``;
    - ``prune``: ``path`` is the teacher's HF folder; keep every ``keep_every``-th layer
      (the first and last always), copy embeddings, norms and head.
    """

    init: Literal["pretrained", "config", "prune"]
    path: str | None = None
    tokenizer: str | None = Field(None, description="HF folder of the tokenizer; default: path")
    config: dict[str, Any] = Field(default_factory=dict)
    keep_every: int = Field(2, ge=1)
    lora: Lora | None = None

    @model_validator(mode="after")
    def _needs(self) -> Student:
        if self.init in ("pretrained", "prune") and not self.path:
            raise ValueError(f"student.path is required for init: {self.init}")
        if self.init == "config":
            if "model_type" not in self.config:
                raise ValueError("student.config.model_type is required for init: config (e.g. llama)")
            if not (self.tokenizer or self.path):
                raise ValueError("student.tokenizer is required for init: config")
        return self


class Loss(Strict):
    """loss = (1 - kd_weight) * CE(teacher text) + kd_weight * temperature^2 * KL(teacher top-k || student).

    ``kd_tail`` says what happens to the probability the teacher put outside its stored
    top-k (see ``losses.kd_loss``)."""

    kd_weight: float = Field(0.5, ge=0.0, le=1.0, description="0 = pure SFT on teacher text")
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    kd_tail: Literal["renormalize", "bucket"] = "renormalize"
    divergence: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(teacher || student) on the teacher's text; reverse: "
        "KL(student || teacher) on the student's own samples (on-policy rounds, losses.reverse_kl_loss)")

    @model_validator(mode="after")
    def _bucket_needs_t1(self) -> Loss:
        if self.kd_tail == "bucket" and self.temperature != 1.0:
            raise ValueError("loss.kd_tail: bucket needs temperature 1.0 (the tempered tail mass is unknown)")
        if self.divergence == "reverse" and self.temperature != 1.0:
            raise ValueError("loss.divergence: reverse needs temperature 1.0 (the tempered tail mass is unknown)")
        return self


class Optim(Strict):
    lr: float = Field(3e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0.0)


class Scaling(Strict):
    """Where the steps run. ``workers: 1`` (the default) trains in this process, on
    ``device``; ``workers: N > 1`` runs N Ray Train workers (``TorchTrainer``), each on its
    own part of the data, on the Ray cluster (``RAY_ADDRESS``) or a local one.

    Strategy: ``ddp`` keeps a whole copy of the model, its gradients and AdamW state on
    every worker (fastest while that fits one device: about 16 bytes per parameter, so up
    to ~3B parameters on an 80 GB GPU); ``fsdp`` shards parameters, gradients and optimizer
    state across the workers (PyTorch FSDP2, ``fully_shard`` per decoder layer), for
    students whose full training state does not fit one device (an 8B full fine-tune)."""

    workers: int = Field(1, ge=1, description="training processes; > 1 runs on Ray Train")
    use_gpu: bool = Field(False, description="one GPU per worker (Ray Train); bf16 autocast on it")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Ray resources each worker reserves, e.g. {CPU: 4, GPU: 1}")
    strategy: Literal["ddp", "fsdp"] = "ddp"
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint (-1: no limit)")

    @model_validator(mode="after")
    def _fsdp_needs_workers(self) -> Scaling:
        if self.strategy == "fsdp" and self.workers < 2:
            raise ValueError("scaling.strategy: fsdp shards the model across workers; it needs workers >= 2 "
                             "(with one worker use ddp, the default)")
        return self


class TrainConfig(Strict):
    name: str = Field("train", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = 0
    data: Data
    student: Student
    loss: Loss = Field(default_factory=Loss)
    optim: Optim = Field(default_factory=Optim)
    steps: int = Field(ge=1, description="optimizer steps")
    batch_size: int = Field(4, ge=1, description="packed sequences per micro-batch, per worker")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step; global batch = "
                            "batch_size x grad_accum x scaling.workers")
    seq_len: int = Field(512, ge=16, description="tokens per packed sequence")
    shuffle_buffer: int = Field(1024, ge=1, description="rows in the streaming shuffle buffer")
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    scaling: Scaling = Field(default_factory=Scaling)
    output: Path

    @model_validator(mode="after")
    def _distributed_limits(self) -> TrainConfig:
        sc = self.scaling
        if sc.workers > 1 and self.data.max_rows is not None:
            raise ValueError("data.max_rows needs one global row order; it is not supported with "
                             "scaling.workers > 1 (select by teacher, license or score instead)")
        if sc.strategy == "fsdp" and self.student.lora is not None:
            raise ValueError("scaling.strategy: fsdp with student.lora is not supported: LoRA adapters are "
                             "small, use ddp")
        if sc.workers > 1 and sc.use_gpu != (self.device == "cuda") and self.device != "auto":
            raise ValueError(f"device: {self.device} disagrees with scaling.use_gpu: {sc.use_gpu} "
                             "(with workers > 1 the device follows use_gpu; leave device: auto)")
        return self


class Verifier(Strict):
    filters: list[str] = Field(default_factory=lambda: ["nonempty", "format"])
    answer: AnswerFormat = Field(default_factory=AnswerFormat)


class EvalConfig(Strict):
    data: Data
    students: dict[str, str] = Field(min_length=1, description="label -> HF model folder (a trainer's final/)")
    max_rows: int = Field(50, ge=1, description="held-out rows to score")
    max_new_tokens: int = Field(64, ge=1, description="student's greedy answer length")
    verifier: Verifier | None = Field(None, description="filters run on each student's answers")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: Path = Field(description="JSON report")


def _rel(base: Path, p: str | Path) -> str:
    s = str(p)
    if s.startswith("embedded:") or Path(s).is_absolute():
        return s
    return str((base / s).resolve())


def _load(path: str | os.PathLike[str], model: type[Strict], what: str) -> Any:
    path = Path(path)
    cfg = read_model(path, model, what=what)
    base = path.parent.resolve()
    upd: dict[str, Any] = {"data": cfg.data.model_copy(update={"path": Path(_rel(base, cfg.data.path))}),
                           "output": Path(_rel(base, cfg.output))}
    if isinstance(cfg, TrainConfig):
        st = cfg.student
        upd["student"] = st.model_copy(update={
            "path": st.path and _rel(base, st.path), "tokenizer": st.tokenizer and _rel(base, st.tokenizer)})
    else:
        upd["students"] = {k: _rel(base, v) for k, v in cfg.students.items()}
    return cfg.model_copy(update=upd)


def load_train(path: str | os.PathLike[str]) -> TrainConfig:
    return _load(path, TrainConfig, "train file")


def load_eval(path: str | os.PathLike[str]) -> EvalConfig:
    return _load(path, EvalConfig, "eval file")
