"""On-policy distillation rounds: the student samples, the teacher scores the student's
own tokens, the student is trained on the reverse KL (``datagen onpolicy FILE``)."""

from datagen.onpolicy.config import OnPolicyConfig, load
from datagen.onpolicy.rounds import run

__all__ = ["OnPolicyConfig", "load", "run"]
