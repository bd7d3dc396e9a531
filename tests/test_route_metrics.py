"""Routing metrics and signals against hand-computed values (docs/routing.md).

Every table below is small enough to check on paper; the comments hold the arithmetic.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from datagen import records
from datagen.errors import DatagenError
from datagen.filters.base import Verdict
from datagen.route import costs, metrics, signals
from datagen.teachers.spec import Price

# rows 1 and 3 tie at the lowest score; the student fails exactly there
TIES = dict(q_s=[1, 0, 1, 0], q_t=[1, 1, 1, 1], score=[0.9, 0.1, 0.5, 0.1])


def curve_and_ends(q_s, q_t, score):
    return metrics.routing_curve(q_s, q_t, score), float(np.mean(q_s)), float(np.mean(q_t))


def test_curve_with_ties_never_splits_a_tie_block():
    c, weak, strong = curve_and_ends(**TIES)
    # blocks {1,3} {2} {0}: boundaries k = 0, 2, 3, 4; gains 1, 1, 0, 0
    assert c.share.tolist() == [0, 0.5, 0.75, 1]
    assert c.quality.tolist() == [0.5, 1.0, 1.0, 1.0]
    assert c.threshold.tolist()[:3] == [0.1, pytest.approx(0.3), pytest.approx(0.7)]
    assert c.threshold[3] > 0.9
    # PGR(0.25) lies on the straight line between the points: q = 0.75
    assert metrics.pgr(c, weak, strong, 0.25).value == pytest.approx(0.5)
    # AUC = 0.375 + 0.25 + 0.25 = 0.875 -> APGR = (0.875 - 0.5) / 0.5
    assert metrics.apgr(c, weak, strong).value == pytest.approx(0.75)
    assert metrics.cpt(c, weak, strong, 0.5).value == pytest.approx(0.25)
    assert metrics.cpt(c, weak, strong, 0.8).value == pytest.approx(0.4)  # 0.5 + x = 0.9


def test_each_threshold_realises_its_share():
    rng = np.random.default_rng(3)
    score = np.round(rng.normal(size=200), 1)  # many ties
    q_s, q_t = rng.random(200), rng.random(200)
    c = metrics.routing_curve(q_s, q_t, score)
    for share, quality, tau in zip(c.share, c.quality, c.threshold):
        esc = score < tau
        assert esc.mean() == pytest.approx(share)
        assert np.where(esc, q_t, q_s).mean() == pytest.approx(quality)


def test_all_equal_scores_are_the_random_router_whatever_the_row_order():
    q_s, q_t = [1, 0, 0, 1, 0], [1, 1, 0, 1, 1]  # weak 0.4, strong 0.8
    c, weak, strong = curve_and_ends(q_s, q_t, [0.3] * 5)
    flipped = metrics.routing_curve(q_s[::-1], q_t[::-1], [0.3] * 5)
    assert c.share.tolist() == flipped.share.tolist() == [0, 1]
    assert c.quality.tolist() == flipped.quality.tolist() == pytest.approx([0.4, 0.8])
    rnd = metrics.random_curve(q_s, q_t)
    for x in (0.1, 0.5, 0.9):
        assert metrics.pgr(c, weak, strong, x).value == pytest.approx(x)
        assert metrics.pgr(rnd, weak, strong, x).value == pytest.approx(x)
    assert metrics.apgr(c, weak, strong).value == pytest.approx(0.5)
    assert metrics.cpt(c, weak, strong, 0.8).value == pytest.approx(0.8)


def test_a_student_better_on_some_rows_is_not_clipped():
    # sorted: row2 (+1), row3 (+1), row0 (-1: the student is better), row1 (0)
    c, weak, strong = curve_and_ends([1, 1, 0, 0], [0, 1, 1, 1], [0.5, 0.9, 0.1, 0.2])
    assert (weak, strong) == (0.5, 0.75)
    assert c.quality.tolist() == [0.5, 0.75, 1.0, 0.75, 0.75]
    assert metrics.pgr(c, weak, strong, 0.5).value == pytest.approx(2.0)
    # AUC = 0.15625 + 0.21875 + 0.21875 + 0.1875 = 0.78125 -> (0.78125 - 0.5) / 0.25
    assert metrics.apgr(c, weak, strong).value == pytest.approx(1.125)
    assert metrics.cpt(c, weak, strong, 0.5).value == pytest.approx(0.125)
    o = metrics.oracle_curve([1, 1, 0, 0], [0, 1, 1, 1])
    # only the two positive gains are ever escalated: the oracle ends above all-teacher
    assert o.quality.tolist() == [0.5, 0.75, 1.0, 1.0, 1.0]
    assert metrics.pgr(o, weak, strong, 1.0).value == pytest.approx(2.0)
    assert metrics.apgr(o, weak, strong).value == pytest.approx(1.5)  # AUC 0.875


def test_cpt_is_the_first_share_on_a_curve_that_falls_back():
    c, weak, strong = curve_and_ends([1, 1, 0, 0], [0, 1, 1, 1], [0.2, 0.9, 0.1, 0.5])
    assert c.quality.tolist() == [0.5, 0.75, 0.5, 0.75, 0.75]  # up, down, up
    assert metrics.cpt(c, weak, strong, 1.0).value == pytest.approx(0.25)


def test_oracle_on_the_tie_table():
    o = metrics.oracle_curve(TIES["q_s"], TIES["q_t"])
    assert o.quality.tolist() == [0.5, 0.75, 1.0, 1.0, 1.0]
    assert metrics.cpt(o, 0.5, 1.0, 0.5).value == pytest.approx(0.25)
    assert metrics.apgr(o, 0.5, 1.0).value == pytest.approx(0.75)


@pytest.mark.parametrize("q_t, word", [([1, 0], "same"), ([0, 0], "beats")])
def test_pgr_is_undefined_without_a_gap(q_t, word):
    c, weak, strong = curve_and_ends([1, 0], q_t, [0.1, 0.2])
    for m in (metrics.pgr(c, weak, strong, 0.5), metrics.apgr(c, weak, strong), metrics.cpt(c, weak, strong, 0.5)):
        assert m.value is None and word in m.reason
    assert metrics.summary(c, weak, strong)["apgr"] == {"undefined": m.reason}


def test_bad_inputs_are_one_line():
    with pytest.raises(DatagenError, match="one length"):
        metrics.routing_curve([1, 0], [1], [0.1, 0.2])
    with pytest.raises(DatagenError, match=r"\[0, 1\]"):
        metrics.routing_curve([2, 0], [1, 1], [0.1, 0.2])
    with pytest.raises(DatagenError, match="NaN"):
        metrics.routing_curve([1, 0], [1, 1], [float("nan"), 0.2])


def test_operating_point_is_the_largest_student_share_within_tolerance():
    c = metrics.routing_curve(**TIES)
    op = metrics.operating_point(c, 1.0, 0.02)  # losses 50%, 0, 0, 0
    assert (op.share, op.quality, op.loss, op.threshold) == (0.5, 1.0, 0.0, pytest.approx(0.3))
    loose = metrics.operating_point(c, 1.0, 0.5)
    assert loose.share == 0.0 and not (np.asarray(TIES["score"]) < loose.threshold).any()


def test_bootstrap_is_seeded_and_holds_the_estimate():
    rng = np.random.default_rng(0)
    x = rng.random(300)
    stat = lambda i: x[i].mean()  # noqa: E731
    a = metrics.bootstrap(stat, 300, seed=7)
    assert a == metrics.bootstrap(stat, 300, seed=7)
    assert a != metrics.bootstrap(stat, 300, seed=8)
    assert a[0] < x.mean() < a[1] and a[1] - a[0] < 0.2


def test_auroc_and_reliability():
    assert metrics.auroc([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.8]).value == 1.0
    assert metrics.auroc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]).value == 0.0
    assert "no row" in metrics.auroc([0, 0], [0.1, 0.2]).reason
    table = metrics.reliability([1, 1, 0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5, 0.9, 0.9], bins=4)
    assert [(b["rows"], b["ok_rate"]) for b in table] == [(4, 0.5), (2, 1.0)]  # ties share a bin


# --------------------------------------------------------------------------- signals


def test_logprob_signals():
    assert signals.mean_logprob([-1, -2, -3]) == -2
    assert signals.low_logprob([-1, -2, -3, -4], 0.5) == -3  # floor(3 * 0.5) = 1st smallest of 4
    assert signals.low_logprob([-0.1] * 9 + [-5.0]) == -5.0  # one unsure token in ten shows at p10
    assert signals.mean_logprob([]) is None


def test_entropy_tail_modes():
    top = np.log([0.5, 0.25])
    assert signals.position_entropy(top, "bucket") == pytest.approx(1.5 * math.log(2))  # tail 0.25 as one outcome
    assert signals.position_entropy(top, "renormalize") == pytest.approx(
        -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert signals.position_entropy(np.log([0.6, 0.41]), "bucket") == pytest.approx(
        -(0.6 * math.log(0.6) + 0.41 * math.log(0.41)))  # sums over 1: no tail
    with pytest.raises(DatagenError, match="tail"):
        signals.position_entropy(top, "drop")


def test_signals_from_stored_codes_match_floats():
    lps, tops = [-0.1, -2.0, -0.5], [np.log([0.9, 0.05]), np.log([0.3, 0.3]), np.log([0.6, 0.2])]
    ids, top_q = records.encode_top([[1, 2]] * 3, [t.tolist() for t in tops])
    floats = signals.signals({"token_logprobs": lps, "top_logprobs": tops})
    coded = signals.signals({"token_logprobs_q": records.quantize_logprobs(lps), "top_logprobs_q": top_q})
    for name in ("mean_logprob", "low_logprob", "mean_entropy"):
        assert coded[name] == pytest.approx(floats[name], abs=0.02)
    assert floats["format_valid"] is None and floats["agreement"] is None


def test_format_validity_and_agreement():
    keep, drop = Verdict("format", True, "ok"), Verdict("format", False, "format.bad_json")
    assert signals.format_valid([keep, keep]) == 1.0 and signals.format_valid([keep, drop]) == 0.0
    assert signals.format_valid({"keep": False}) == 0.0 and signals.format_valid(True) == 1.0
    assert signals.agreement("A", ["a", " A ", "b", None]) == 0.5
    assert signals.agreement("", ["", "x"]) == 0.0  # no answer agrees with nothing
    assert signals.agreement("a", []) is None
    assert signals.score({"mean_entropy": 0.7}, "mean_entropy") == -0.7
    with pytest.raises(DatagenError, match="unknown signal"):
        signals.score({}, "vibes")


# --------------------------------------------------------------------------- costs


def test_costs_per_1k():
    out = costs.per_1k(np.array([0.001, 0.001]), np.array([0.01, 0.03]), np.array([0, 1]))
    # cascade: mean(0.001, 0.031) * 1000 = 16; all-teacher 20
    assert out == {"all_student": pytest.approx(1.0), "all_teacher": pytest.approx(20.0),
                   "cascade": pytest.approx(16.0), "saving": pytest.approx(0.2)}
    rows = [{"id": "a", "prompt_tokens": 1000, "teacher_completion_tokens": 2000, "student_seconds": 3.6}]
    c_s, c_t = costs.row_costs(rows, costs.CostModel(teacher_price=Price(input_per_mtok=1, output_per_mtok=5),
                                                     student_usd_per_hour=1.0))
    assert c_s.tolist() == pytest.approx([0.001]) and c_t.tolist() == pytest.approx([0.011])


@pytest.mark.parametrize("model, match", [
    (costs.CostModel(student_usd_per_hour=1.0), "teacher_price"),
    (costs.CostModel(teacher_basis="gpu", student_usd_per_hour=1.0), "teacher_usd_per_gpu_hour"),
    (costs.CostModel(teacher_price=Price(input_per_mtok=1, output_per_mtok=1)), "student_usd_per_hour"),
])
def test_a_missing_price_is_one_line(model, match):
    with pytest.raises(DatagenError, match=match) as e:
        costs.row_costs([{"id": "a", "student_seconds": 1, "prompt_tokens": 1, "teacher_completion_tokens": 1}], model)
    assert "\n" not in str(e.value)


def test_a_row_missing_a_cost_field_is_named():
    model = costs.CostModel(teacher_basis="gpu", teacher_usd_per_gpu_hour=2.0, student_usd_per_hour=1.0)
    with pytest.raises(DatagenError, match="row 'b': no teacher_gpu_seconds"):
        costs.row_costs([{"id": "b", "student_seconds": 1}], model)


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    with pytest.raises(DatagenError, match=r"datagen\[route\]"):
        metrics.auroc([1, 0], [0.1, 0.2])
