"""router.json, decide(), the drift check, the learned router and the report's bad-input lines."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from datagen.cli import main
from datagen.errors import ConfigError, DatagenError
from datagen.route import learned, report
from datagen.route.router import Data, Expected, Identity, Interval, LearnedModel, Router, check, load, write

from .conftest import REPO

STUDENT = Identity(name="s", model="org/student", revision="r1")
TEACHER = Identity(name="t", model="org/teacher")


def make_router(**kw) -> Router:
    share = Interval(value=0.3, low=0.25, high=0.35)
    return Router(**{"signal": "mean_logprob", "threshold": -1.0, "tolerance": 0.02, "student": STUDENT,
                     "teacher": TEACHER, "data": Data(eval_sha256="ab", calibration_rows=10, test_rows=10),
                     "expected": Expected(teacher_share=share, quality=share, quality_loss=share), **kw})


def test_round_trip_and_decide(tmp_path):
    path = tmp_path / "router.json"
    write(path, make_router())
    r = load(path, student=STUDENT)
    assert r == make_router()
    assert r.decide({"token_logprobs": [-0.5, -1.0]}) == "student"  # mean -0.75 >= -1
    assert r.decide({"token_logprobs": [-0.5, -2.0]}) == "teacher"  # mean -1.25 < -1
    assert r.decide({"signals": {"mean_logprob": -1.0}}) == "student"  # at the threshold: kept
    with pytest.raises(DatagenError, match="no mean_logprob signal"):
        r.decide({"response": "no logprobs"})


def test_entropy_router_escalates_the_unsure():
    r = make_router(signal="mean_entropy", threshold=-0.5)  # score = -entropy
    sure = {"top_logprobs": [np.log([0.99, 0.005]).tolist()]}
    unsure = {"top_logprobs": [np.log([0.4, 0.3]).tolist()]}
    assert (r.decide(sure), r.decide(unsure)) == ("student", "teacher")


def test_a_router_for_another_student_is_one_line(tmp_path, capsys):
    path = tmp_path / "router.json"
    write(path, make_router())
    other = Identity(name="s", model="org/student", revision="r2")
    with pytest.raises(ConfigError, match=r"calibrated for student 's' \(org/student@r1\), not 's' \(org/student@r2\)"):
        load(path, student=other)
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text(json.dumps({"token_logprobs": [-0.1], "student": other.model_dump()}) + "\n")
    assert main(["route", "check", str(path), str(traffic)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "answers from student" in err[0]


@pytest.mark.parametrize("text, match", [
    ("{not json", "cannot read a router file"),
    ('{"format": "other"}', "not a datagen router file"),
    ("vibes", "router.json: signal: unknown 'vibes' \\(known: "),
])
def test_bad_router_files(tmp_path, text, match):
    path = tmp_path / "router.json"
    if text == "vibes":
        text = json.dumps({**make_router().model_dump(), "signal": "vibes"})
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load(path)


def test_drift_check():
    r = make_router()  # calibrated share 25-35%
    low = [{"token_logprobs": [-0.1]}] * 70 + [{"token_logprobs": [-3.0]}] * 30  # 30%
    high = [{"token_logprobs": [-0.1]}] * 30 + [{"token_logprobs": [-3.0]}] * 70  # 70%
    assert not check(r, low)["drift"] and check(r, low)["share"] == 0.3
    out = check(r, high)
    assert out["drift"] and "DRIFT" in out["line"]
    # a tiny sample does not cry drift on noise: 1 of 2 escalated, Wilson interval ~9%-91%
    assert not check(r, high[29:31])["drift"]


def test_learned_router_matches_scikit_learn_without_it():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)) * [1.0, 3.0] + [-1.0, 2.0]
    ok = (x[:, 0] + 0.3 * x[:, 1] + rng.normal(size=200) * 0.5) > -0.4
    model = learned.fit(x, ok, ["mean_logprob", "low_logprob"])
    ref = LogisticRegression().fit(StandardScaler().fit_transform(x), ok)
    want = ref.predict_proba(StandardScaler().fit(x).transform(x))[:, 1]
    got = [model.prob({"mean_logprob": a, "low_logprob": b}) for a, b in x]
    assert np.allclose(got, want, atol=1e-9)
    assert "always" in learned.fit(x, np.ones(200, bool), ["mean_logprob", "low_logprob"]).reason
    r = make_router(signal="learned", threshold=0.5, learned=model)
    assert r.decide({"signals": {"mean_logprob": 3.0, "low_logprob": 8.0}}) == "student"
    with pytest.raises(ValueError, match="exactly when signal is learned"):
        make_router(signal="learned")
    with pytest.raises(ValueError, match="one entry each"):
        LearnedModel(features=["mean_logprob"], mean=[0, 1], scale=[1], coef=[1], intercept=0)


def test_router_imports_nothing_heavy():
    code = ("import sys, datagen.route.router as r; "
            "r.Identity(name='a', model='b'); "
            "print(sorted(m for m in ('torch', 'ray', 'vllm', 'sklearn', 'transformers', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the report


def eval_rows(n=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        conf = rng.normal()
        rows.append({"id": f"r{i}", "q_student": float(conf > -0.3), "q_teacher": 1.0,
                     "signals": {"mean_logprob": conf + 0.3 * rng.normal(), "mean_entropy": -conf},
                     "student": STUDENT.model_dump(), "teacher": TEACHER.model_dump(),
                     "axes": {"topic": "hard" if i % 4 == 0 else "easy"}, "prompt_tokens": 100, "cluster_size": 1,
                     "teacher_gpu_seconds": 2.0, "student_seconds": 0.2})
        if i % 4 == 0:
            rows[-1]["q_student"] = 0.0
    return rows


def test_report_end_to_end_through_the_cli(tmp_path, capsys):
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in eval_rows()))
    (tmp_path / "cost.yaml").write_text("teacher_basis: gpu\nteacher_usd_per_gpu_hour: 3.6\nstudent_usd_per_hour: 3.6\n")
    assert main(["route", "report", str(src), "--out", str(tmp_path / "out"), "--cost", str(tmp_path / "cost.yaml")]) == 0
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    r = load(tmp_path / "out" / "router.json", student=STUDENT)
    assert r.data.eval_sha256 == report.file_sha256(src)
    assert set(rep["routers"]) == {"mean_logprob", "mean_entropy", "learned"}
    assert rep["skipped"]["agreement"] == "missing on 120 of 120 rows"
    assert rep["baselines"]["random"]["apgr"] == pytest.approx(0.5)
    # mean_entropy is -conf, a perfect ranking apart from the "hard" rows
    assert rep["routers"]["mean_entropy"]["auroc"] > 0.7
    cost = rep["cost_per_1k"]  # $0.002 student + $0.002 teacher per row
    assert cost["all_teacher"] == pytest.approx(2.0) and cost["all_student"] == pytest.approx(0.2)
    hard = next(s for s in rep["slices"] if s["slice"] == "axis:topic=hard")
    assert hard["q_student"] == 0.0 and hard["gap"] == 1.0
    assert all(w["q_student"] < w["q_teacher"] for w in rep["worst"])
    assert [w["score"] for w in rep["worst"]] == sorted((w["score"] for w in rep["worst"]), reverse=True)
    assert "routing:" in capsys.readouterr().out
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"signals": r["signals"]}) + "\n" for r in eval_rows(seed=1)))
    assert main(["route", "check", str(tmp_path / "out" / "router.json"), str(traffic)]) in (0, 1)


def test_auroc_for_worse_and_for_wrong_part_when_the_teacher_is_wrong_too():
    """Hand-computed on the four test rows (score, q_student, q_teacher): the student is
    wrong on the two lowest scores (AUROC wrong 1.0) but worse than the teacher only on
    the one scoring 0.2, below two of the other three (AUROC worse 2/3)."""
    test = [(0.1, 0.0, 0.0), (0.2, 0.0, 1.0), (0.8, 1.0, 0.0), (0.9, 1.0, 1.0)]
    cal = [(0.1 * i, float(i > 4), 1.0) for i in range(10)]
    rows = [{"id": f"{split}{i}", "split": split, "q_student": qs, "q_teacher": qt, "signals": {"mean_logprob": s},
             "student": STUDENT.model_dump(), "teacher": TEACHER.model_dump()}
            for split, part in (("calibration", cal), ("test", test)) for i, (s, qs, qt) in enumerate(part)]
    rep, _ = report.build(rows, eval_sha256="x", resamples=10)
    r = rep["routers"]["mean_logprob"]
    assert rep["failures"] == {"worse": 1, "wrong": 2}
    assert r["auroc_wrong"] == 1.0 and r["auroc"] == pytest.approx(2 / 3)
    assert sum(b["rows"] * b["right_rate"] for b in r["reliability"]) == pytest.approx(2)
    assert sum(b["rows"] * b["ok_rate"] for b in r["reliability"]) == pytest.approx(3)
    assert "worse than the teacher on 1, wrong on 2" in report.tables(rep)[0].title


def test_report_bad_input_lines():
    rows = eval_rows(8)
    rows[3]["student"] = {"name": "x", "model": "y"}
    with pytest.raises(DatagenError, match="same 'student' identity"):
        report.build(rows, eval_sha256="x")
    rows = [dict(r, split="test") for r in eval_rows(8)]
    with pytest.raises(DatagenError, match="0 calibration and 8 test rows"):
        report.build(rows, eval_sha256="x")
    rows = [dict(r, signals={}) for r in eval_rows(8)]
    with pytest.raises(DatagenError, match="no router has a score on every row"):
        report.build(rows, eval_sha256="x")


def test_answers_from_another_tokenizer_are_refused_where_a_signal_reads_tokens(tmp_path, capsys):
    path = tmp_path / "router.json"
    write(path, make_router(student_tokenizer="tok-calibrated"))
    same = {"token_logprobs": [-0.1], "tokenizer_fingerprint": "tok-calibrated"}
    other = {"token_logprobs": [-0.1], "tokenizer_fingerprint": "tok-other"}
    r = load(path)
    assert r.decide(same) == "student" and r.decide({"token_logprobs": [-0.1]}) == "student"  # none: trusted
    with pytest.raises(DatagenError, match="calibrated on log-probs over the student's tokenizer tok-calibrat"):
        r.decide(other)
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps(a) + "\n" for a in (same, other, other)))
    assert main(["route", "check", str(path), str(traffic)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of 3 answers (first: #2)" in err[0] and "tokenized by tok-other" in err[0]
    # a signal that reads no tokens does not care which tokenizer the answer used
    fmt = make_router(signal="format_valid", threshold=0.5, student_tokenizer="tok-calibrated")
    assert fmt.decide({"format_ok": True, "tokenizer_fingerprint": "tok-other"}) == "student"
    learned_on_tokens = make_router(signal="learned", threshold=0.5, student_tokenizer="tok-calibrated",
                                    learned=LearnedModel(features=["format_valid", "mean_entropy"], mean=[0, 0],
                                                         scale=[1, 1], coef=[1, 1], intercept=0))
    assert learned_on_tokens.reads_tokens and learned_on_tokens.tokenizer_mismatch(other)


def test_the_report_writes_the_students_tokenizer_and_refuses_two(tmp_path):
    rows = [dict(r, student_tokenizer="tok-a") for r in eval_rows(40)]
    _, chosen = report.build(rows, eval_sha256="x")
    assert chosen.student_tokenizer == "tok-a"
    rows[5]["student_tokenizer"] = "tok-b"
    with pytest.raises(DatagenError, match="come from 2 tokenizers"):
        report.build(rows, eval_sha256="x")


def test_a_price_missing_for_the_cost_axis_is_one_line(tmp_path, capsys):
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in eval_rows(40)))
    (tmp_path / "cost.yaml").write_text("teacher_basis: api\nstudent_usd_per_hour: 1.0\n")
    assert main(["route", "report", str(src), "--out", str(tmp_path / "out"), "--cost", str(tmp_path / "cost.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher_basis is api but cost.teacher_price" in err[0]
    assert not (tmp_path / "out").exists()  # nothing half-written
