"""The on-policy loss (``losses.reverse_kl_loss``) against reference computations.

Tolerances: 1e-5 absolute against float64 references (the loss works in float32)."""

from __future__ import annotations

import math

import pytest
import torch

from datagen.train import losses
from datagen.train.config import Loss


def _top(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(teacher_logits.double(), -1)
    vals, ids = lp.topk(k, dim=-1)
    return ids, vals.float(), torch.ones_like(ids, dtype=torch.bool)


def test_full_vocabulary_top_k_is_the_exact_reverse_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g) * 2
    ids, lps, mask = _top(teacher, 11)
    got = losses.reverse_kl_loss(student, ids, lps, mask)
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=student.double()),
                                            torch.distributions.Categorical(logits=teacher.double()))
    assert torch.allclose(got.double(), ref, atol=1e-5)
    # the same student as the teacher: nothing to learn
    assert torch.allclose(losses.reverse_kl_loss(teacher, ids, lps, mask), torch.zeros(5), atol=1e-5)


def test_a_hand_computed_position_with_a_tail_and_padding():
    # vocabulary of 4; the teacher's top-2 are ids 2 and 0 with p = 0.6, 0.3 (tail 0.1);
    # the third top-k slot is padding and must not count
    q = [0.1, 0.2, 0.4, 0.3]  # the student's full distribution
    logits = torch.tensor([[math.log(v) for v in q]])
    ids = torch.tensor([[2, 0, 1]])
    lps = torch.tensor([[math.log(0.6), math.log(0.3), -1.0]])
    mask = torch.tensor([[True, True, False]])
    q_tail = 1 - 0.4 - 0.1
    ref = 0.4 * math.log(0.4 / 0.6) + 0.1 * math.log(0.1 / 0.3) + q_tail * math.log(q_tail / 0.1)
    assert losses.reverse_kl_loss(logits, ids, lps, mask).item() == pytest.approx(ref, abs=1e-6)


def test_a_truncated_top_k_is_a_lower_bound_and_a_peaked_teacher_is_floored():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(8, 50, generator=g), torch.randn(8, 50, generator=g) * 3
    full = losses.reverse_kl_loss(student, *_top(teacher, 50))
    for k in (1, 5, 20):
        assert (losses.reverse_kl_loss(student, *_top(teacher, k)) <= full + 1e-5).all()
    # a teacher whose stored top-1 holds all the mass: the student's tail costs log(q_tail / floor)
    logits = torch.tensor([[0.0, 0.0]])  # q = (0.5, 0.5)
    got = losses.reverse_kl_loss(logits, torch.tensor([[0]]), torch.tensor([[0.0]]), torch.tensor([[True]]))
    ref = 0.5 * math.log(0.5 / 1.0) + 0.5 * math.log(0.5 / losses.TEACHER_TAIL_FLOOR)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_descending_the_loss_moves_the_student_onto_the_teacher():
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(4, 30, generator=g) * 2
    student = torch.zeros(4, 30, requires_grad=True)
    top = _top(teacher, 30)
    opt = torch.optim.SGD([student], lr=1.0)
    first = None
    for _ in range(200):
        loss = losses.reverse_kl_loss(student, *top).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_reverse_needs_temperature_one():
    with pytest.raises(ValueError, match="reverse needs temperature 1.0"):
        Loss(divergence="reverse", temperature=2.0)
