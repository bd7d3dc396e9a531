"""Teachers with ``mode: batch`` (datagen/batch/) against the fake server's files and
batches endpoints, through the real ``openai`` client: the room alone for the fault
paths (fast, no Ray), and the real CLI for what a user sees: the same rows as online at
the batch price, a SIGKILLed driver that resumes without paying twice, a refused upload
as one line, and ``datagen cancel``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from datagen.batch import BatchRoom, BatchState
from datagen.config import OpenAITeacher, Price, teacher_identity
from datagen.prompts import Request
from datagen.storage.shards import ShardStore

from .conftest import REPO, datagen, write_job
from .test_pipeline import all_ids, expected_ids

FAST = {"poll_s": 0.05, "max_rows": 5}


def teacher(server, **batch) -> OpenAITeacher:
    return OpenAITeacher(name="t", backend="openai", model="m", base_url=server.base_url, mode="batch",
                         price={"input_per_mtok": 2.0, "output_per_mtok": 8.0}, batch={**FAST, **batch})


def requests(n: int, chair_every: int = 0) -> list[Request]:
    def text(i: int) -> str:
        return f"order {10000 + i}: my office chair broke" if chair_every and i % chair_every == 0 else \
            f"order {10000 + i}: my desk lamp flickers"
    return [Request(row_id=f"r{i:03d}", prompt_id=f"p{i}", sample_index=0, seed=i,
                    messages=[{"role": "user", "content": text(i)}], teacher="t", provenance={"job": "x"})
            for i in range(n)]


def drain(room: BatchRoom, timeout: float = 30.0) -> dict[str, dict]:
    """Every row the room hands back, by id (each at most once)."""
    got: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while room.busy():
        assert time.monotonic() < deadline, room.view()
        for _, reqs, gens in room.answers():
            for r, g in zip(reqs, gens):
                assert r.row_id == g["row_id"] and r.row_id not in got
                got[r.row_id] = g
        time.sleep(0.01)
    return got


def submit(room: BatchRoom, reqs: list[Request]) -> None:
    for r in reqs:
        assert room.add(r)
    room.flush()


# -- prices and identity ---------------------------------------------------------------

def test_batch_price_is_half_unless_the_job_says_otherwise():
    p = Price(input_per_mtok=2.0, output_per_mtok=8.0)
    assert p.batch().cost(1_000_000, 1_000_000) == pytest.approx(5.0)
    q = Price(input_per_mtok=2.0, output_per_mtok=8.0, batch_input_per_mtok=1.5, batch_output_per_mtok=6.0)
    assert q.batch().cost(1_000_000, 1_000_000) == pytest.approx(7.5)
    t = OpenAITeacher(name="t", backend="openai", model="m", base_url="http://127.0.0.1:9/v1", price=p.model_dump())
    assert t.billed_price == t.price and not t.in_batches  # online: the online price
    b = t.model_copy(update={"mode": "batch"})
    assert b.in_batches and b.billed_price == p.batch()


def test_mode_and_batch_settings_leave_the_run_identity_alone():
    # A run may be submitted in batches and finished online (or the reverse), and outputs
    # written before batch prices existed keep their fingerprint.
    online = OpenAITeacher(name="t", backend="openai", model="m", base_url="http://127.0.0.1:9/v1",
                           price={"input_per_mtok": 2.0, "output_per_mtok": 8.0})
    batch = online.model_copy(update={"mode": "batch", "batch": online.batch.model_copy(update={"poll_s": 5.0})})
    ident = teacher_identity(online.model_dump(mode="json"))
    assert ident == teacher_identity(batch.model_dump(mode="json"))
    assert "mode" not in ident and "batch" not in ident
    assert ident["price"] == {"input_per_mtok": 2.0, "output_per_mtok": 8.0}


def test_a_job_has_one_fingerprint_online_or_in_batches_old_or_new(tmp_path):
    import yaml

    from datagen import run as runner
    from datagen.config import parse_job

    price = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
    base = yaml.safe_load(write_job(tmp_path, base_url="http://127.0.0.1:9/v1", count=4,
                                    extra_teacher={"price": price}).read_text())
    seen = set()
    for extra in ({}, {"mode": "batch"}, {"mode": "batch", "batch": {"poll_s": 1, "max_rows": 10}}):
        data = {**base, "teachers": [{**base["teachers"][0], **extra}]}
        job = parse_job(data, where="job.yaml", base_dir=tmp_path)
        stream = runner.prepare(job)[0]
        seen.add((runner.run_fingerprint(job, stream.stream_hash),
                  runner.run_fingerprint(job, stream.stream_hash, legacy=True)))
    # the fingerprints datagen gave this job before batch mode existed (main at 620c7e6)
    assert seen == {("2ef00435daaf2307c04bdd7350611428", "b8ccba4231cc7ab214bc79d20b16f168")}


# -- the room against the fake server (no Ray) -------------------------------------------

def test_lines_are_answered_like_online_rows_with_batch_cost(tmp_path, fake_server):
    room = BatchRoom([teacher(fake_server)], tmp_path)
    submit(room, requests(12))
    got = drain(room)
    assert sorted(got) == [f"r{i:03d}" for i in range(12)]
    assert fake_server.batches.calls["create"] == 3 and fake_server.batches.lines == 12  # 5 + 5 + 2
    assert fake_server.requests == 0  # nothing went through /chat/completions
    for rid, g in got.items():
        assert g["error"] is None and g["text"].startswith("{") and g["attempts"] == 1
    view = room.view()
    assert view["rows"]["answered"] == 12 and view["by_status"] == {"completed": 3}
    tokens = [(g["prompt_tokens"], g["completion_tokens"]) for g in got.values()]
    assert view["batch_usd"] == pytest.approx(sum(p * 1.0 + c * 4.0 for p, c in tokens) / 1e6)
    assert view["online_usd"] == pytest.approx(2 * view["batch_usd"])


def test_failed_lines_and_expired_rows_are_submitted_again_then_failed_with_reasons(tmp_path, fake_server):
    fake_server.batches.inject("failed_lines", match="office chair")  # the first batch: a 500 for these lines
    fake_server.batches.inject("expire")  # the second: expires with the first half answered
    room = BatchRoom([teacher(fake_server, max_submissions=2, max_rows=10)], tmp_path)
    submit(room, requests(10, chair_every=4))  # chairs: r000, r004, r008
    got = drain(room)
    assert len(got) == 10
    assert {rid for rid, g in got.items() if g["attempts"] == 2} == {"r000", "r004", "r008"}
    assert got["r000"]["error"] is None  # answered the second time
    failed = {rid: g["error"] for rid, g in got.items() if g["error"]}
    assert failed == dict.fromkeys(["r004", "r008"], "batch.expired: not answered within the batch's completion "
                                   "window (after 2 batch submissions)")
    assert fake_server.batches.calls["create"] == 2 and fake_server.batches.lines == 10 + 3
    assert room.view()["rows"] == {"buffered": 0, "in_batches": 0, "answered": 8, "resubmitted": 3, "failed": 2}


def test_expired_rows_go_again_and_fail_with_the_reason_once_submissions_run_out(tmp_path, fake_server):
    fake_server.batches.inject("expire")
    fake_server.batches.inject("failed_lines", match="office chair")
    room = BatchRoom([teacher(fake_server, max_submissions=2)], tmp_path)
    submit(room, requests(4, chair_every=3))  # chair: r000, r003
    got = drain(room)
    assert {rid: g["attempts"] for rid, g in got.items()} == {"r000": 1, "r001": 1, "r002": 2, "r003": 2}
    assert [rid for rid, g in got.items() if g["error"]] == ["r003"]
    assert got["r003"]["error"] == "teacher.http_500: injected line failure (after 2 batch submissions)"


def test_a_malformed_output_line_is_submitted_again(tmp_path, fake_server):
    fake_server.batches.inject("malformed_output")
    room = BatchRoom([teacher(fake_server)], tmp_path)
    submit(room, requests(3))
    got = drain(room)
    assert all(g["error"] is None for g in got.values()) and len(got) == 3
    assert got["r002"]["attempts"] == 2  # its line was garbage the first time
    assert fake_server.batches.lines == 4


def test_a_failed_batch_fails_its_rows_without_paying_again(tmp_path, fake_server):
    fake_server.batches.inject("fail")
    room = BatchRoom([teacher(fake_server)], tmp_path)
    submit(room, requests(2))
    got = drain(room)
    assert {g["error"] for g in got.values()} == {
        "batch.failed: the provider failed the whole batch (invalid_request: injected: failed) "
        "(after 1 batch submission)"}
    assert fake_server.batches.calls["create"] == 1


def test_a_status_check_the_provider_fails_is_tried_again_at_the_next_poll(tmp_path, fake_server):
    fake_server.batches.inject("status_500", times=4)  # the client's first try and its 3 retries
    room = BatchRoom([teacher(fake_server)], tmp_path)
    submit(room, requests(2))
    assert room.answers() == [] and room.view()["problem"] == (
        "teacher 't': status of batch b00001 refused: HTTP 500: injected status failure")
    assert len(drain(room)) == 2 and room.view()["problem"] is None
    assert fake_server.batches.calls["retrieve"] == 5 and fake_server.batches.calls["create"] == 1


def test_a_new_room_polls_the_batches_of_the_one_before(tmp_path, fake_server):
    fake_server.batches.inject("slow", times=None, seconds=0.5)
    first = BatchRoom([teacher(fake_server)], tmp_path)
    submit(first, requests(7))
    assert fake_server.batches.calls["create"] == 2
    del first  # the driver died after submitting
    second = BatchRoom([teacher(fake_server)], tmp_path)
    held = second.resume(done={"r000"})  # r000 was committed before the crash
    assert held == {f"r{i:03d}" for i in range(1, 7)}
    got = drain(second)
    assert sorted(got) == sorted(held)
    assert fake_server.batches.calls["create"] == 2 and fake_server.batches.calls["upload"] == 2


def test_a_finished_batch_whose_rows_were_not_committed_is_read_again_not_paid_again(tmp_path, fake_server):
    first = BatchRoom([teacher(fake_server)], tmp_path)
    submit(first, requests(4))
    assert len(drain(first)) == 4  # handed to the driver, which died before committing two of them
    again = BatchRoom([teacher(fake_server)], tmp_path)
    assert again.resume(done={"r000", "r001"}) == {"r002", "r003"}
    got = drain(again)
    assert sorted(got) == ["r002", "r003"] and all(g["error"] is None for g in got.values())
    calls = fake_server.batches.calls
    assert (calls["create"], calls["content"], fake_server.batches.lines) == (1, 2, 4)


def test_a_batch_created_but_not_recorded_is_found_not_created_again(tmp_path, fake_server):
    room = BatchRoom([teacher(fake_server)], tmp_path)
    submit(room, requests(3))
    # The driver died between the provider's create and the state write that records it.
    state = BatchState.load(tmp_path)
    b = state.batches["b00001"]
    b.id, b.status = None, "preparing"
    state.save()
    again = BatchRoom([teacher(fake_server)], tmp_path)
    assert again.resume(done=set()) == {"r000", "r001", "r002"}
    assert len(drain(again)) == 3
    assert fake_server.batches.calls["create"] == 1 and fake_server.batches.calls["list"] == 1


# -- through the CLI ------------------------------------------------------------------

def rows(out: Path) -> dict[str, dict]:
    store = ShardStore.open(out)
    return {r["row_id"]: r for s in ("accepted", "rejected", "failed") for r in store.read(s).to_pylist()}


def test_a_batch_run_has_the_online_runs_rows_at_the_batch_price(tmp_path, fake_server):
    price = {"input_per_mtok": 2.0, "output_per_mtok": 8.0}
    (tmp_path / "on").mkdir()
    online = write_job(tmp_path / "on", base_url=fake_server.base_url, count=12, extra_teacher={"price": price})
    assert datagen("run", str(online)).returncode == 0
    (tmp_path / "b").mkdir()
    batch = write_job(tmp_path / "b", base_url=fake_server.base_url, count=12,
                      extra_teacher={"price": price, "mode": "batch", "batch": FAST})
    res = datagen("run", str(batch))
    assert res.returncode == 0, res.stderr
    on, off = rows(tmp_path / "on" / "out"), rows(tmp_path / "b" / "out")
    assert set(on) == set(off) == expected_ids(batch) and len(off) == 12
    assert fake_server.batches.lines == 12  # each row went through a batch once
    for rid, r in off.items():
        o = on[rid]
        assert (r["response"], r["token_ids"], r["top_ids"], r["usage"]["prompt_tokens"]) == \
            (o["response"], o["token_ids"], o["top_ids"], o["usage"]["prompt_tokens"])
        assert r["usage"]["cost_usd"] == pytest.approx(o["usage"]["cost_usd"] / 2)
    online_total = sum(o["usage"]["cost_usd"] for o in on.values())
    assert f"the same rows online (USD) │ {online_total:.4f}" in " ".join(res.stdout.split()) or \
        f"{online_total:.4f}" in res.stdout
    last = json.loads((tmp_path / "b" / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["batches"]["submitted"] == 3 and last["batches"]["rows"]["answered"] == 12
    shown = datagen("inspect", str(tmp_path / "b" / "out"))
    assert shown.returncode == 0 and "provider batches" in shown.stdout and "b00003" in shown.stdout


def _start(job: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "datagen", *args, str(job), "--quiet"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait(what, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no batch was created"
        time.sleep(0.05)


def test_a_sigkilled_driver_resumes_its_batches_without_submitting_again(tmp_path, fake_server):
    fake_server.batches.inject("slow", times=None, seconds=4.0)
    job = write_job(tmp_path, base_url=fake_server.base_url, count=12, extra_teacher={"mode": "batch", "batch": FAST})
    proc = _start(job, "run")
    calls = fake_server.batches.calls
    _wait(lambda: calls["create"] == 3 and calls["retrieve"] >= 1, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    assert all_ids(tmp_path / "out") == []
    res = datagen("resume", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    after = all_ids(tmp_path / "out")
    assert len(after) == len(set(after)) and set(after) == expected_ids(job), Counter(after).most_common(3)
    assert (calls["upload"], calls["create"], fake_server.batches.lines) == (3, 3, 12)  # nothing paid twice
    assert fake_server.requests == 0


def test_a_refused_upload_is_one_clear_line_without_secrets(tmp_path, fake_server):
    secret = "sk-test-0123456789abcdef"
    fake_server.batches.inject("upload_400")
    job = write_job(tmp_path, base_url=fake_server.base_url, count=4,
                    extra_teacher={"mode": "batch", "batch": FAST, "api_key_env": "DATAGEN_TEST_KEY"})
    res = datagen("run", str(job), env={"DATAGEN_TEST_KEY": secret})
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: teacher 'fake': upload of batch input file b00001 refused: HTTP 400: injected: "
                      "invalid batch input file"], res.stderr
    assert "Traceback" not in res.stderr
    for text in [res.stdout, res.stderr] + [p.read_text() for p in (tmp_path / "out" / "batches").iterdir()]:
        assert secret not in text and fake_server.base_url not in text


def test_cancel_cancels_the_open_batches_and_resume_finishes(tmp_path, fake_server):
    fake_server.batches.inject("hold")  # the first batch never finishes on its own
    job = write_job(tmp_path, base_url=fake_server.base_url, count=4, extra_teacher={"mode": "batch", "batch": FAST})
    out = tmp_path / "out"
    proc = _start(job, "run")
    _wait(lambda: fake_server.batches.calls["retrieve"] >= 2, proc)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    res = datagen("cancel", str(out))
    assert res.returncode == 0, res.stderr
    assert "batch b00001 (fake, 4 rows, provider id batch_1): cancelling" in res.stdout
    assert fake_server.batches.calls["cancel"] == 1
    assert "cancelling" in datagen("inspect", str(out)).stdout
    res = datagen("resume", str(out))  # the cancelled batch answered nothing: its rows go again
    assert res.returncode == 0, res.stderr
    assert sorted(all_ids(out)) == sorted(expected_ids(job))
    assert fake_server.batches.calls["create"] == 2
    again = datagen("cancel", str(out))
    assert again.returncode == 0 and "0 open batches cancelled" in again.stdout


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DATAGEN_TEST_VLLM_RUN_BATCH"),
                    reason="opt-in (DATAGEN_TEST_VLLM_RUN_BATCH=1): ~5 min of vLLM on 2 shared cores, over CI's budget")
def test_vllm_run_batch_reads_our_lines_and_its_output_becomes_rows(tmp_path):
    """vLLM's own batch runner (``vllm.entrypoints.openai.run_batch``, CPU) on the input
    file batch mode uploads, serving the embedded teacher: every line answered, and each
    output line parsed as an online answer (text, usage, top-k with token ids). Opt-in:
    it took 313 s on the shared 2-core machine, which CI's 45 min cannot spare."""
    from datagen.batch.lines import read_results, request_line
    from datagen.teachers import embedded
    from datagen.teachers.openai_api import OpenAICompatibleTeacher

    folder = embedded.materialize("embedded:smollm2-135m-instruct")
    cfg = OpenAITeacher(name="smol", backend="openai", model=str(folder), base_url="http://127.0.0.1:9/v1",
                        mode="batch", request_token_ids=True, sampling={"max_tokens": 16, "logprobs": 5})
    reqs = [Request(row_id=f"r{i}", prompt_id=f"p{i}", sample_index=0, seed=i, teacher="smol", provenance={},
                    messages=[{"role": "user", "content": q}])
            for i, q in enumerate(["Say hello in French.", "Name three colours.", "What is 2 + 2?"])]
    (tmp_path / "in.jsonl").write_bytes(b"".join(request_line(cfg, r) for r in reqs))
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}" if cores > 1 else "0", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(tmp_path / "in.jsonl"),
         "-o", str(tmp_path / "out.jsonl"), "--model", str(folder), "--enforce-eager", "--dtype", "float32",
         "--max-model-len", "1024", "--max-logprobs", "5"],
        env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    found, bad = read_results((tmp_path / "out.jsonl").read_text())
    assert bad == 0 and sorted(found) == ["r0", "r1", "r2"]
    parser = OpenAICompatibleTeacher(cfg)
    for r in reqs:
        g = parser.answer(r.row_id, found[r.row_id].body)
        assert g.error is None and g.text and g.prompt_tokens > 0 and 0 < g.completion_tokens <= 16
        assert len(g.token_ids) == g.completion_tokens and all(len(t) == 5 for t in g.top_ids)
