"""The whole routing loop on CPU: a datagen output (an OpenAI-compatible fake teacher, so no
teacher engine starts) -> a student trained by `datagen train` -> `datagen route eval`
through a real vLLM CPU engine in a student actor -> `datagen route report`.

Asserted: every eval prompt is held out from training; the near-duplicate screening count
is reported; the operating point was chosen on the calibration split and is reported on
the test split; the student's answers came with log-probs (its signals are computed), and
its tokenizer went into router.json; `datagen report` draws the routing section.
Slow (one vLLM engine start, ~40 s on 2 cores; training ~20 s).
"""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import REPO, datagen, write_job

pytestmark = pytest.mark.slow
HOLDOUT = 0.5


def test_generate_train_eval_route(tmp_path, fake_server):
    from datagen.storage import open_store
    from datagen.train.data import is_heldout

    job = write_job(tmp_path, base_url=fake_server.base_url, count=60)
    res = datagen("run", str(job), "-q", timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"

    train = yaml.safe_load((REPO / "examples" / "train.yaml").read_text())
    train.update(steps=40, batch_size=2, seq_len=256, checkpoint_every=100, output=str(tmp_path / "student"),
                 loss={"kd_weight": 0.0})  # the fake teacher's token ids are not SmolLM2's
    train["data"].update(path=str(out), holdout_fraction=HOLDOUT)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    res = datagen("train", str(tmp_path / "train.yaml"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    ev = yaml.safe_load((REPO / "examples" / "route_eval.yaml").read_text())
    ev["data"].update(path=str(out), holdout_fraction=HOLDOUT)
    ev["student"].update(path=str(tmp_path / "student" / "final"), max_tokens=24, samples=2)
    ev.update(output=str(tmp_path / "eval.jsonl"), num_cpus=2)
    (tmp_path / "route_eval.yaml").write_text(yaml.safe_dump(ev))
    res = datagen("route", "eval", str(tmp_path / "route_eval.yaml"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "dropped as near-duplicates" in res.stdout and "quality: verifier:" in res.stdout

    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    meta = json.loads((tmp_path / "eval.jsonl.meta.json").read_text())
    store = open_store(out)
    trained = {r["prompt_id"] for r in store.iter_rows("accepted") if not is_heldout(r["prompt_id"], HOLDOUT)}
    assert rows and all(is_heldout(r["id"], HOLDOUT) for r in rows) and not {r["id"] for r in rows} & trained
    assert meta["counts"]["rows"] == len(rows) == meta["counts"]["held_out"] - meta["counts"]["contaminated"]
    assert all(r["signals"]["mean_logprob"] is not None and r["signals"]["agreement"] is not None for r in rows)
    # the fake teacher answers prose for "office chair": a failure of the teacher under the format filter
    assert {r["q_teacher"] for r in rows} <= {0.0, 1.0} and sum(r["q_teacher"] for r in rows) > len(rows) / 2

    res = datagen("route", "report", str(tmp_path / "eval.jsonl"), "--out", str(tmp_path / "route"), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "route" / "report.json").read_text())
    assert report["eval_set"]["counts"] == meta["counts"] and report["quality"] == [meta["quality"]]
    cal, test = report["rows"]["calibration"], report["rows"]["test"]
    assert cal > 0 and test > 0 and cal + test == len(rows)
    op = report["routers"][report["chosen"]]["operating_point"]
    assert set(op["calibration"]) == {"teacher_share", "quality", "quality_loss"}
    assert {"teacher_share", "quality", "quality_loss"} <= set(op["test"])
    router = json.loads((tmp_path / "route" / "router.json").read_text())
    assert router["threshold"] == op["threshold"] and router["data"]["calibration_rows"] == cal
    assert router["student_tokenizer"] == meta["student_tokenizer"] is not None
    print(res.stdout[-2000:])

    # the report page draws it (the routing section of `datagen report`)
    res = datagen("report", str(out), "--routing", str(tmp_path / "route"), "--to", str(tmp_path / "r.html"))
    assert res.returncode == 0, res.stderr[-3000:]
    html = (tmp_path / "r.html").read_text()
    assert 'id="fig-routing"' in html and f'data-figure="routing.chosen">{report["chosen"]}<' in html
