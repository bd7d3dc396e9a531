"""The training signals: cross-entropy on the teacher's text, KD on its top-k, and the
reverse KL for on-policy distillation.

Both take logits of the positions that carry a target only (``[N, V]``) and work in
float32 whatever the model's dtype, so bf16 on CUDA does not round the log-probs.

KD is the forward KL, KL(teacher || student), the mode-covering direction: the student is
pushed to put mass wherever the teacher does. We only have the teacher's top-k, so the
full teacher distribution is not available; ``kd_tail`` says what stands in for the rest:

``renormalize`` (default)
    The teacher's top-k, tempered, is renormalised to sum to 1 (its tail mass is spread
    over the top-k in proportion). The student's log-probs are the *full-vocabulary*
    softmax, gathered at those k ids -- deliberately not renormalised. The loss is then
    the exact KL between two full distributions, one of which has zero tail:
    ``sum_i p_i (log p_i - log q_i)``, which is >= 0 and zero only when the student puts
    exactly ``p`` on the top-k and nothing elsewhere. (Renormalising the student over the
    top-k too would make its tail invisible: a student with 90% of its mass on other
    tokens could score zero.) With k = 20 the teacher's dropped tail is usually < 1-2%.

``bucket`` (temperature 1 only)
    The raw logprobs are normalised over the full vocabulary, so the teacher's tail mass
    is known: ``1 - sum(top-k)``. The KL is taken over k + 1 outcomes -- the top-k ids and
    "any other token" -- with the student's tail ``1 - sum_i q_i``. This is the exact KL of
    the coarsened distributions, a lower bound on the full KL (data-processing), and it
    does not push the student's tail to zero. Under a temperature the teacher's tail mass
    depends on logits we do not have, hence temperature 1 only.

The reverse KL, KL(student || teacher), is the mode-seeking direction used on the
student's *own* samples (on-policy distillation, ``datagen onpolicy``; GKD with beta = 1,
Agarwal et al. 2024; Thinking Machines, "On-Policy Distillation", 2025): at every position
of a sequence the student sampled, the student is pushed to put its mass where the
teacher does, and away from tokens the teacher would not say. See ``reverse_kl_loss``.

Scaling by ``temperature**2`` (Hinton et al.) is applied by the caller when mixing, so
the gradient scale of the KD term does not shrink as the temperature grows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy ``[N]`` (natural log)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def kd_loss(logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor, top_mask: torch.Tensor,
            *, temperature: float = 1.0, tail: str = "renormalize") -> torch.Tensor:
    """Per-position KL(teacher || student) ``[N]``.

    logits ``[N, V]`` student; top_ids / top_logprobs / top_mask ``[N, K]`` the teacher's
    top-k (raw natural-log probabilities) with ``top_mask`` False on padding entries.
    """
    s_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    s = s_all.gather(-1, top_ids)  # [N, K] student log q_i, full-vocab normalised
    neg_inf = torch.finfo(torch.float32).min
    if tail == "renormalize":
        t = (top_logprobs.float() / temperature).masked_fill(~top_mask, neg_inf)
        log_p = t - torch.logsumexp(t, dim=-1, keepdim=True)
        p = log_p.exp() * top_mask
        return (p * (log_p - s)).masked_fill(~top_mask, 0.0).sum(-1)
    if tail == "bucket":
        if temperature != 1.0:
            raise ValueError("kd tail 'bucket' needs temperature 1.0")
        log_p = top_logprobs.float().masked_fill(~top_mask, neg_inf)
        p = log_p.exp() * top_mask
        head = (p * (log_p - s)).masked_fill(~top_mask, 0.0).sum(-1)
        # tails: teacher's from its stored probabilities, student's from its own top-k mass
        p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
        s_head = torch.logsumexp(s.masked_fill(~top_mask, neg_inf), dim=-1).clamp_max(-1e-7)
        log_q_tail = torch.log(-torch.expm1(s_head))  # log(1 - sum q_i), stable near 0
        log_p_tail = torch.log(p_tail.clamp_min(1e-30))
        return head + torch.where(p_tail > 0, p_tail * (log_p_tail - log_q_tail), torch.zeros_like(p_tail))
    raise ValueError(f"unknown kd tail mode {tail!r}")


TEACHER_TAIL_FLOOR = 1e-5
"""Smallest teacher tail mass ``reverse_kl_loss`` assumes: the stored top-k of a peaked
teacher can sum to 1 within quantisation, and ``log 0`` would make any student tail mass
an infinite loss. With the floor, all of the student's tail costs at most
``log(1 / 1e-5) ~ 11.5`` nats per position."""


def reverse_kl_loss(logits: torch.Tensor, top_ids: torch.Tensor, top_logprobs: torch.Tensor,
                    top_mask: torch.Tensor) -> torch.Tensor:
    """Per-position KL(student || teacher) ``[N]`` over k + 1 outcomes.

    Arguments as ``kd_loss``; the positions are those of the student's own sampled tokens,
    with the teacher's top-k from teacher-forced re-scoring (``datagen.rescore``).

    The estimator is analytic at each position, not the single-sample one: the exact KL
    between the two distributions coarsened to {teacher's top-k ids, any other token},
    ``sum_i q_i (log q_i - log p_i) + q_tail (log q_tail - log p_tail)``, where ``q`` is the
    student's full-vocabulary softmax gathered at the k ids and ``q_tail = 1 - sum q_i``,
    and ``p_tail = max(1 - sum p_i, TEACHER_TAIL_FLOOR)``. By the data-processing inequality
    it is a lower bound on the full reverse KL, equal to it when the top-k covers the
    vocabulary; its gradient has no sampling variance (the single-sample estimator
    ``log q(y) - log p(y)`` needs the teacher's log-prob of the sampled token, which is
    outside the stored top-k exactly when it matters most). Temperature 1 only: the
    teacher's tail is known only for the raw distribution.

    Not covered: the sequence-level term (how a token changes later positions' states);
    like GKD and the per-token on-policy recipes, each position is a separate target.
    """
    s = torch.log_softmax(logits.float(), dim=-1).gather(-1, top_ids)  # [N, K] log q_i
    neg_inf = torch.finfo(torch.float32).min
    s = s.masked_fill(~top_mask, neg_inf)
    q = s.exp() * top_mask
    log_p = top_logprobs.float().masked_fill(~top_mask, 0.0)
    head = (q * (s - log_p)).masked_fill(~top_mask, 0.0).sum(-1)
    s_head = torch.logsumexp(s, dim=-1).clamp_max(-1e-7)
    log_q_tail = torch.log(-torch.expm1(s_head))  # log(1 - sum q_i), stable near 0
    p_tail = (1.0 - (top_logprobs.float().exp() * top_mask).sum(-1)).clamp_min(TEACHER_TAIL_FLOOR)
    return head + log_q_tail.exp() * (log_q_tail - torch.log(p_tail))


def mix(ce: torch.Tensor, kd: torch.Tensor | None, *, kd_weight: float, temperature: float) -> torch.Tensor:
    """``(1 - w) * CE + w * T^2 * KD`` on per-token means."""
    if kd is None or kd_weight == 0.0:
        return ce
    return (1.0 - kd_weight) * ce + kd_weight * temperature**2 * kd
