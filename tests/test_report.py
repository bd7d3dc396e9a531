"""`datagen report`: the page a real run writes (Ray + the fake teacher on 127.0.0.1), opened
in a real headless Chromium; its figures read from the DOM and checked against the
manifest; secrets and log-prob arrays kept out; every user string escaped; empty states."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from datagen import records
from datagen.report import write_report
from datagen.storage.shards import ShardStore
from datagen.testing import browser

from .conftest import datagen, write_job
from .test_shards import META, output, row

SENTINEL = "sk-SENTINEL-report-never-in-the-page-51c2"
needs_browser = pytest.mark.skipif(
    browser.find() is None and not os.environ.get("DATAGEN_REQUIRE_BROWSER"),
    reason="chromium + chromedriver not installed (apt-get install chromium chromium-driver; .ci/run does)")


@pytest.fixture(scope="module")
def run_out(tmp_path_factory) -> Path:
    """One run with rows in every stream: prose answers are rejected, one product always
    gets HTTP 500 (failed), a priced teacher whose key variable holds the sentinel."""
    from datagen.testing.fake_openai import FakeOpenAIServer

    from .conftest import extract_answer

    tmp = tmp_path_factory.mktemp("report")
    with FakeOpenAIServer(answer=extract_answer) as server:
        server.inject("500", times=None, match="desk lamp")  # the first fault that matches is served
        server.inject("latency", times=None, seconds=0.05)
        job = write_job(tmp, base_url=server.base_url, count=20, n=2, shard_rows=15,
                        extra_teacher={"api_key_env": "DATAGEN_TEST_KEY", "max_attempts": 1,
                                       "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
                        runtime={"num_cpus": 2, "metrics_every_s": 0.3})
        res = datagen("run", str(job), env={"DATAGEN_TEST_KEY": SENTINEL})
    assert res.returncode == 3, res.stderr  # the desk lamp's rows failed
    assert "report: " in res.stdout and "warning" not in res.stderr, res.stderr
    return tmp / "out"


def _manifest(out: Path) -> tuple[Counter, dict[str, Counter], int]:
    data = json.loads((out / "manifest.json").read_text())
    counts, reasons = Counter(), {"rejected": Counter(), "failed": Counter()}
    for s in data["shards"]:
        counts[s["stream"]] += s["rows"]
        if s["stream"] in reasons:
            reasons[s["stream"]].update(s.get("reasons", {}))
    return counts, reasons, len(data["shards"])


def _int(text: str) -> int:
    return int(text.replace(",", "").strip())


@needs_browser
def test_chromium_shows_the_manifests_figures_without_console_errors(run_out, tmp_path):
    from selenium.webdriver.common.by import By

    counts, reasons, shards = _manifest(run_out)
    assert counts["accepted"] and reasons["rejected"] and reasons["failed"]
    with browser.chromium() as page:
        page.get((run_out / "report.html").as_uri())
        errors = [e for e in page.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors

        def figure(key: str) -> str:
            return page.find_element(By.CSS_SELECTOR, f'[data-figure="{key}"]').text

        for stream in records.STREAMS:
            assert _int(figure(f"rows.{stream}")) == counts[stream]
        assert _int(figure("rows.total")) == sum(counts.values())
        assert _int(figure("shards")) == shards
        for stream, by_reason in reasons.items():
            shown = page.find_elements(By.CSS_SELECTOR, f'[data-figure^="reason.{stream}."]')
            got = {e.get_attribute("data-figure").split(".", 2)[2]: _int(e.text) for e in shown}
            assert got == dict(by_reason)
        # every section drew what this run has: figures, samples of each stream, the teacher's cost
        for fig in ("throughput", "reasons", "lengths", "logprobs", "similarity", "licenses"):
            assert page.find_elements(By.CSS_SELECTOR, f"#fig-{fig} svg"), fig
        assert {e.get_attribute("data-sample") for e in page.find_elements(By.CSS_SELECTOR, "[data-sample]")} \
            == set(records.STREAMS)
        assert float(figure("cost_usd")) > 0
        page.set_window_size(1280, page.execute_script("return document.body.scrollHeight"))
        shot = tmp_path / "report.png"
        assert page.save_screenshot(str(shot)) and shot.stat().st_size > 20_000


def test_the_page_holds_no_secret_no_logprob_arrays_and_fetches_nothing(run_out):
    html = (run_out / "report.html").read_text()
    assert SENTINEL not in html and "DATAGEN_TEST_KEY" not in html
    assert "127.0.0.1" not in html  # the teacher's base_url is not shown
    assert "<script" not in html and "https://" not in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        'xmlns:xlink="http://www.w3.org/1999/xlink"', "")  # namespace names, never fetched
    assert "default-src 'none'" in html  # nothing is fetched when the page is viewed
    # A row's log-prob codes are not in the page (summaries only), and the page stays small.
    row = ShardStore.open(run_out).read("accepted", columns=["token_logprobs_q", "top_logprobs_q"]).slice(0, 1)
    lp = row.column("token_logprobs_q").to_pylist()[0]
    top = row.column("top_logprobs_q").to_pylist()[0]
    assert len(lp) >= 4 and ", ".join(map(str, lp[:4])) not in html and str(top[0]) not in html
    assert len(html) < 400_000


def test_report_cli_adds_dedupe_training_and_eval(run_out, tmp_path):
    from datagen.config import Dedupe
    from datagen.dedupe.view import dedupe

    view = dedupe(run_out, Dedupe(), dest=tmp_path / "view")
    (run_out / "dedupe").symlink_to(tmp_path / "view")  # where `datagen dedupe OUT` puts it
    train = tmp_path / "student"
    train.mkdir()
    (train / "log.jsonl").write_text("".join(json.dumps({"step": i, "loss": 3 - i / 10, "ce": 2.0, "kd": 1 - i / 20,
                                                         "lr": 1e-3, "tokens": 100}) + "\n" for i in range(1, 11)))
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"data": str(run_out), "rows": 4, "holdout_fraction": 0.2,
                              "teacher": {"answer_agreement": 1.0, "token_kl": 0.0, "perplexity": 1.5, "verifier_pass": 1.0},
                              "students": {"student": {"answer_agreement": 0.25, "token_kl": 1.2, "perplexity": 9.0,
                                                       "verifier_pass": 0.5}}}))
    dest = tmp_path / "r.html"
    res = datagen("report", str(run_out), "--to", str(dest), "--train", str(train), "--eval", str(ev))
    assert res.returncode == 0 and str(dest) in res.stdout, res.stderr
    html = dest.read_text()
    for section in ("dedupe", "train", "eval"):
        assert f'data-empty="{section}"' not in html, section
    assert f'data-figure="dedupe.kept">{view.kept:,}<' in html
    assert 'id="fig-train"' in html and "<td>student</td>" in html and "25.0%" in html
    assert 'data-empty="routing"' in html  # the hook for routing curves, empty until they exist


def test_empty_states_and_escaping_of_user_strings(tmp_path):
    root = tmp_path / "o"
    store = ShardStore.create(root, output(shard_rows=10), job_meta=META)
    evil = '<img src=x onerror="alert(1)">'
    store.add("rejected", row(1, messages=[{"role": "user", "content": evil}], response=f"</pre>{evil}",
                              verdicts=[{"filter": "f", "keep": False, "reason": "f.<b>bad</b>", "score": None,
                                         "details": None}]))
    store.commit_all()
    store.close()
    html = Path(write_report(root)).read_text()
    assert evil not in html and "<b>bad</b>" not in html
    assert "&lt;img src=x" in html and 'data-figure="reason.rejected.f.&lt;b&gt;bad&lt;/b&gt;">1<' in html
    for section in ("throughput", "prompts", "dedupe", "logprobs", "train", "eval"):
        assert f'data-empty="{section}"' in html, section
    assert 'data-figure="rows.accepted">0<' in html


def test_routing_section_from_a_route_report(tmp_path):
    """`datagen route report` output drawn into the page: found under OUT/route/ or given
    with --routing; its numbers read back from the DOM in Chromium when one is installed."""
    from datagen.route import costs, report as route_report

    from .test_route_router import eval_rows

    root = tmp_path / "o"
    store = ShardStore.create(root, output(shard_rows=10), job_meta=META)
    store.add("accepted", row(1))
    store.commit_all()
    store.close()
    rows = eval_rows(80)
    rows[0]["axes"] = {"topic": '<b>"hard"</b>'}  # a user string: escaped
    for r in rows[1::3]:  # the teacher wrong too on some of the student's mistakes: the two AUROCs part
        if r["q_student"] == 0.0:
            r["q_teacher"] = 0.0
    rep, _ = route_report.build(rows, eval_sha256="x", resamples=200, cost=costs.CostModel(
        teacher_basis="gpu", teacher_usd_per_gpu_hour=3.6, student_usd_per_hour=3.6))
    assert 0 < rep["failures"]["worse"] < rep["failures"]["wrong"]
    assert any(abs(r["auroc"] - r["auroc_wrong"]) > 0.01 for r in rep["routers"].values())
    (root / "route").mkdir()
    (root / "route" / "report.json").write_text(json.dumps(rep))
    dest = tmp_path / "r.html"
    res = datagen("report", str(root), "--to", str(dest))  # found in OUT/route/
    assert res.returncode == 0, res.stderr
    html = dest.read_text()
    assert 'data-empty="routing"' not in html and 'id="fig-routing"' in html
    assert '<b>"hard"</b>' not in html and 'topic=&lt;b&gt;&#34;hard' in html
    assert html.count("data-below-floor") == sum(s["below_floor"] for s in rep["slices"]) > 0
    bad = datagen("report", str(root), "--to", str(dest), "--routing", str(tmp_path / "nowhere"))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "no routing report" in bad.stderr
    if browser.find() is None and not os.environ.get("DATAGEN_REQUIRE_BROWSER"):
        return
    from selenium.webdriver.common.by import By

    chosen = rep["routers"][rep["chosen"]]
    with browser.chromium() as page:
        page.get(dest.as_uri())
        assert not [e for e in page.get_log("browser") if e["level"] == "SEVERE"]

        def figure(key: str) -> str:
            return page.find_element(By.CSS_SELECTOR, f'[data-figure="{key}"]').text

        assert figure("routing.chosen") == rep["chosen"]
        assert page.find_elements(By.CSS_SELECTOR, "#fig-routing svg")
        for name, r in rep["routers"].items():
            assert float(figure(f"routing.apgr.{name}")) == pytest.approx(r["apgr"], abs=5e-4)
            assert float(figure(f"routing.auroc.{name}")) == pytest.approx(r["auroc"], abs=5e-4)
            assert float(figure(f"routing.auroc_wrong.{name}")) == pytest.approx(r["auroc_wrong"], abs=5e-4)
        assert [int(figure(f"routing.failures.{k}")) for k in ("worse", "wrong")] == [
            rep["failures"]["worse"], rep["failures"]["wrong"]]
        share = chosen["operating_point"]["test"]["teacher_share"]
        assert figure(f"routing.share.{rep['chosen']}") == f"{share['value']:.1%} [{share['low']:.1%}, {share['high']:.1%}]"
        assert figure("routing.student_share") == f"{1 - share['value']:.1%}"
        assert float(figure("routing.cascade_usd")) == pytest.approx(rep["cost_per_1k"]["cascade"], abs=5e-5)
        assert int(figure("routing.flagged")) == sum(s["below_floor"] for s in rep["slices"])
