"""The on-policy file: which job's prompts, which student to start from, which teacher
scores, how many rounds of what size. Validated like a train file; relative paths resolve
against the file's folder.

Not covered: an API teacher (re-scoring needs the teacher's distribution at every position
of a *given* text: a self-hosted vLLM teacher, ``datagen rescore``'s rule).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from datagen.teachers.spec import VLLMEngine
from datagen.train.config import Optim, _rel
from datagen.validation import Strict, read_model


class Sample(Strict):
    """How the student samples in each round (its own distribution: temperature 1 by default)."""

    prompts: int = Field(ge=1, description="prompts drawn per round (a different draw each round)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    max_tokens: int = Field(64, ge=1)
    batch_size: int = Field(64, ge=1, description="prompts per request to the student's engine")
    engine: VLLMEngine | None = Field(None, description="the student's vLLM engine options (max_model_len: its "
                                      "context); default: the teacher's")


class RoundTrain(Strict):
    """Each round's update: pure reverse KL on the round's samples (``losses.reverse_kl_loss``)."""

    steps: int = Field(ge=1, description="optimizer steps per round")
    batch_size: int = Field(4, ge=1)
    seq_len: int = Field(512, ge=16)
    optim: Optim = Field(default_factory=lambda: Optim(lr=5e-5, warmup_steps=0))
    checkpoint_every: int = Field(50, ge=1)
    device: str = "auto"


class OnPolicyConfig(Strict):
    name: str = Field("onpolicy", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = 0
    job: Path = Field(description="the generation job file: its template, seeds and axes are the prompts")
    teacher: str | None = Field(None, description="name of the job's vLLM teacher that scores; default: the first")
    student: str = Field(description="HF folder the first round starts from (a `datagen train` output's final/)")
    holdout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="prompts never trained on; must equal the train file's")
    rounds: int = Field(2, ge=1, le=100)
    sample: Sample
    train: RoundTrain
    output: Path


def load(path: str | os.PathLike[str]) -> OnPolicyConfig:
    path = Path(path)
    cfg = read_model(path, OnPolicyConfig, what="on-policy file")
    base = path.parent.resolve()
    return cfg.model_copy(update={"job": Path(_rel(base, cfg.job)), "student": _rel(base, cfg.student),
                                  "output": Path(_rel(base, cfg.output))})
