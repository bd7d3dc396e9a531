"""The OpenAI-compatible teacher against a real HTTP server on 127.0.0.1 (the fake
server), through the official openai client: every fault is survived or becomes a
failed row with a reason, and the API key never shows up anywhere."""

from __future__ import annotations

import asyncio
import json

import pytest

from datagen.config import OpenAITeacher
from datagen.teachers.openai_api import OpenAICompatibleTeacher
from datagen.testing.fake_openai import FakeOpenAIServer


def teacher(server: FakeOpenAIServer, **kw) -> OpenAICompatibleTeacher:
    cfg = {"name": "t", "backend": "openai", "model": "fake", "base_url": server.base_url,
           "timeout_s": 1.0, "max_attempts": 4, "max_concurrency": 4,
           "sampling": {"temperature": 0, "max_tokens": 32}}
    cfg.update(kw)
    return OpenAICompatibleTeacher(OpenAITeacher.model_validate(cfg))


def ask(t: OpenAICompatibleTeacher, *texts: str):
    reqs = [{"row_id": f"r{i}", "messages": [{"role": "user", "content": x}], "seed": i}
            for i, x in enumerate(texts)]

    async def go():
        try:
            return await t.generate(reqs)
        finally:
            await t.aclose()

    return asyncio.run(go())


@pytest.fixture
def server():
    with FakeOpenAIServer() as s:
        yield s


def test_plain_answer_with_usage(server):
    [g] = ask(teacher(server), "hello there")
    assert g.error is None
    assert g.text == "echo: hello there"
    assert g.finish_reason == "stop"
    assert g.completion_tokens == 3 and g.prompt_tokens == 2
    assert g.token_ids is None  # logprobs not asked for


@pytest.mark.parametrize("kind", ["429", "408", "500", "503", "reset", "malformed", "truncated", "garbage",
                                  "undecodable"])
def test_transient_faults_are_retried(server, kind):
    server.inject(kind, times=2, retry_after=0.05)
    [g] = ask(teacher(server), "hi")
    assert g.error is None, g.error
    assert g.text == "echo: hi"
    assert g.attempts == 3
    assert server.served[kind] == 2 and server.served["ok"] == 1


def test_hang_is_cut_by_timeout_then_retried(server):
    server.inject("hang", times=1, seconds=3)
    t = teacher(server, timeout_s=0.5)
    [g] = ask(t, "hi")
    assert g.error is None
    assert g.attempts == 2 and server.requests == 2
    assert server.served["hang"] == 1 and server.served["ok"] == 1
    assert t.limiter.cuts == {"timeout": 1}  # a time-out is a congestion signal


def test_a_reset_connection_is_a_connection_error_not_a_time_out(server):
    # The client's aiohttp transport calls a reset a "connect time-out"; it is neither
    # slow nor the server's push-back, so it costs one retry and no concurrency.
    server.inject("reset", times=1)
    t = teacher(server)
    [g] = ask(t, "hi")
    assert g.error is None and g.attempts == 2
    assert server.served["reset"] == 1 and server.served["ok"] == 1
    assert not t.limiter.cuts


def test_retry_after_is_honoured(server):
    # 2 s is four times the longest first back-off the jitter could draw (0.5 s), so only
    # a client that waited as told gets here this late.
    server.inject("429", times=1, retry_after=2.0)
    [g] = ask(teacher(server), "hi")
    assert g.error is None
    assert g.latency_s >= 2.0
    assert g.attempts == 2 and server.requests == 2
    early, late = sorted(at for at, _ in server.arrivals)
    assert late - early >= 2.0


def test_back_off_is_full_jitter_bounded_and_yields_to_retry_after():
    from types import SimpleNamespace

    from datagen.teachers.openai_api import _Wait

    wait = _Wait(base=0.5, cap=20.0)
    for attempt in range(1, 9):
        bound = min(20.0, 0.5 * 2 ** (attempt - 1))
        draws = [wait(SimpleNamespace(attempt_number=attempt, outcome=None)) for _ in range(400)]
        assert all(0.0 <= d <= bound for d in draws)
        # Spread over the whole range (not a fixed delay, not a narrow band): clients
        # that failed together must not come back together.
        assert min(draws) < 0.1 * bound and max(draws) > 0.9 * bound
        assert len(set(draws)) > 390
    told = SimpleNamespace(response=SimpleNamespace(headers={"retry-after": "7"}))
    state = SimpleNamespace(attempt_number=1, outcome=SimpleNamespace(exception=lambda: told))
    assert wait(state) == 7.0


def test_retry_after_pauses_the_whole_replica(server):
    # One request is told to wait 0.5 s; the others, queued behind a limit of 2, must
    # not be sent in the meantime either (they would hit the same wall).
    server.inject("429", times=1, match="first", retry_after=0.5)
    server.inject("latency", times=None, seconds=0.05)
    t = teacher(server, max_concurrency=2, adaptive_concurrency=False)
    gens = ask(t, "first", *[f"next {i}" for i in range(5)])
    assert all(g.error is None for g in gens)
    assert server.requests == 7 and server.served["429"] == 1
    hit = next(at for at, kind in server.arrivals if kind == "429")
    others = sorted(at for at, kind in server.arrivals if kind != "429")
    assert len(others) == 6
    # The first pair went out together, so its other half may reach the server just
    # before or just after the 429; everything sent later waited out the pause.
    early = [at for at in others if at - hit < 0.5]
    assert len(early) <= 1 and all(abs(at - hit) < 0.25 for at in early)


def test_a_burst_of_429s_cuts_concurrency_once(server):
    server.inject("429", times=3, retry_after=0.05)
    t = teacher(server, max_concurrency=16)
    gens = ask(t, *[f"m{i}" for i in range(12)])
    assert all(g.error is None for g in gens)
    assert server.served["429"] == 3 and server.requests == 15
    # The three 429s answered requests sent together (slow start: 4 at once): one cut.
    assert t.limiter.cuts == {"429": 1}


def test_rising_latency_backs_off_without_any_429(server):
    # A self-hosted server never says 429: it gets slower as its queue grows.
    server.inject("latency", times=30, seconds=0.01)
    server.inject("latency", times=None, seconds=0.25)
    t = teacher(server, max_concurrency=8, latency_backoff=2.0)
    gens = ask(t, *[f"m{i}" for i in range(60)])
    assert all(g.error is None for g in gens)
    assert t.limiter.cuts["latency"] >= 1 and "429" not in t.limiter.cuts
    assert t.limiter.limit < 8


def test_request_budget_paces_requests(server):
    import time

    t = teacher(server, max_concurrency=32, adaptive_concurrency=False, requests_per_minute=600)  # 10/s
    start = time.monotonic()
    gens = ask(t, *[f"m{i}" for i in range(25)])
    took = time.monotonic() - start
    assert all(g.error is None for g in gens) and server.requests == 25
    # A bucket of one second's worth (10) may go at once; the other 15 wait for 10/s.
    # (A lower bound: a loaded machine can only make it slower.)
    assert took >= 1.5


@pytest.mark.parametrize("kind,code", [("500", "teacher.http_500"), ("malformed", "teacher.malformed_response"),
                                       ("garbage", "teacher.malformed_response"),
                                       ("undecodable", "teacher.malformed_response"),
                                       ("truncated", "teacher.connection"), ("reset", "teacher.connection"),
                                       ("hang", "teacher.timeout")])
def test_persistent_fault_becomes_failed_row_with_reason(server, kind, code):
    server.inject(kind, times=None)
    [g] = ask(teacher(server, max_attempts=3), "hi")
    assert g.text is None
    assert g.error.startswith(code), g.error
    assert "after 3 attempts" in g.error
    assert server.requests == 3


@pytest.mark.parametrize("kind", ["400", "409"])
def test_client_error_is_not_retried(server, kind):
    # A 4xx that is not 408/429 will not get better by asking again.
    server.inject(kind, times=None)
    t = teacher(server)
    [g] = ask(t, "hi")
    assert g.error.startswith(f"teacher.http_{kind}")
    assert g.attempts == 1 and server.requests == 1
    assert not t.limiter.cuts  # a bad request says nothing about the server's load


def test_one_bad_row_does_not_sink_its_batch(server):
    server.inject("500", times=None, match="poison")
    gens = ask(teacher(server, max_attempts=2), "fine 1", "poison", "fine 2")
    assert [g.error is None for g in gens] == [True, False, True]
    assert [g.row_id for g in gens] == ["r0", "r1", "r2"]


def test_concurrency_is_bounded(server):
    server.inject("latency", times=None, seconds=0.1)
    gens = ask(teacher(server, max_concurrency=3), *[f"m{i}" for i in range(12)])
    assert all(g.error is None for g in gens)
    assert server.max_concurrent <= 3


def test_logprobs_without_token_ids_are_not_stored(server):
    # A server that names tokens by text gives nothing KD can use: store nothing rather
    # than something misleading. (And the vLLM-only request field is not sent.)
    t = teacher(server, sampling={"temperature": 0, "max_tokens": 32, "logprobs": 5})
    [g] = ask(t, "one two three")
    assert g.error is None and g.text == "echo: one two three"
    assert g.token_ids is None and g.top_ids is None


def test_retry_after_parsing():
    import httpx

    from datagen.teachers.openai_api import _retry_after

    class E(Exception):
        def __init__(self, headers):
            self.response = httpx.Response(429, headers=headers)

    assert _retry_after(E({"retry-after": "2.5"})) == 2.5
    assert _retry_after(E({"retry-after-ms": "1500"})) == 1.5
    assert _retry_after(E({"retry-after": "999"})) == 60.0  # capped
    for bad in ("nan", "-3", "soon", "0", "0.0"):
        assert _retry_after(E({"retry-after": bad})) is None
    # "Retry now" is no hint (every rejected request would come back at once, unjittered);
    # a header that cannot be read does not hide the other one.
    assert _retry_after(E({"retry-after-ms": "0"})) is None
    assert _retry_after(E({"retry-after-ms": "soon", "retry-after": "3"})) == 3.0
    assert _retry_after(E({"retry-after-ms": "0", "retry-after": "2"})) == 2.0
    import email.utils
    import time as _t

    when = email.utils.formatdate(_t.time() + 30, usegmt=True)
    assert 25 <= _retry_after(E({"retry-after": when})) <= 31


def test_server_that_ignores_logprobs_gives_null_not_invented_values():
    with FakeOpenAIServer(logprobs=False) as s:
        t = teacher(s, sampling={"temperature": 0, "max_tokens": 32, "logprobs": 5}, request_token_ids=True)
        [g] = ask(t, "one two three")
    assert g.error is None and g.text == "echo: one two three"
    assert g.token_ids is g.token_logprobs is g.top_ids is g.top_logprobs is None


def test_token_strings_map_to_ids_through_the_named_tokenizer():
    # A server that names tokens by text (OpenAI's API) plus the teacher's tokenizer:
    # ids come from the token bytes; one unmappable alternative -> the row has none.
    from transformers import AutoTokenizer

    from datagen.teachers import embedded

    name = "embedded:smollm2-135m-instruct"
    tok = AutoTokenizer.from_pretrained(str(embedded.materialize(name)))
    with FakeOpenAIServer(answer=lambda m: "hello world") as s:
        t = teacher(s, sampling={"temperature": 0, "max_tokens": 32, "logprobs": 1}, tokenizer=name)
        [g] = ask(t, "hi")
        assert g.token_ids == tok.encode("hello world") == [x[0] for x in g.top_ids]
        assert g.token_logprobs == [-0.05, -0.05]
        assert t.info()["tokenizer_fingerprint"].startswith("sha256:")
        # top-3: the fake's alternatives are named "alt1", "alt2": not tokens of this vocab
        t3 = teacher(s, sampling={"temperature": 0, "max_tokens": 32, "logprobs": 3}, tokenizer=name)
        [g3] = ask(t3, "hi")
    assert g3.error is None and g3.text == "hello world"
    assert g3.token_ids is None and g3.top_ids is None and g3.top_logprobs is None


def test_tokenizer_that_is_not_byte_level_is_refused(tmp_path):
    from datagen.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        OpenAICompatibleTeacher(OpenAITeacher.model_validate({
            "name": "t", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
            "tokenizer": str(tmp_path / "nothing-here")}))


def test_logprobs_with_token_ids(server):
    t = teacher(server, sampling={"temperature": 0, "max_tokens": 32, "logprobs": 5}, request_token_ids=True)
    [g] = ask(t, "one two three")
    assert len(g.token_ids) == len(g.token_logprobs) == len(g.top_ids) == g.completion_tokens == 4
    assert all(len(ids) == 5 for ids in g.top_ids)
    assert all(lp[0] >= lp[-1] for lp in g.top_logprobs)
    from datagen.testing.fake_openai import _tid

    assert g.token_ids == [_tid(x) for x in ("echo:", " one", " two", " three")]
    assert [ids[0] for ids in g.top_ids] == g.token_ids


@pytest.mark.parametrize("bad", [None, "token_id:x", "hello", 7])
def test_logprob_ids_are_all_or_nothing(bad):
    # One entry without a usable id (and no tokenizer to map text) nulls the row's KD columns.
    t = OpenAICompatibleTeacher(OpenAITeacher.model_validate({
        "name": "t", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
        "sampling": {"logprobs": 2}}))

    def entry(name, lp):
        return {"token": name, "logprob": lp, "bytes": None}

    def response(second_top):
        content = [{**entry("token_id:5", -0.1), "top_logprobs": [entry("token_id:5", -0.1), entry("token_id:9", -2)]},
                   {**entry("token_id:6", -0.2), "top_logprobs": [entry("token_id:6", -0.2), entry(second_top, -3)]}]
        return {"choices": [{"message": {"content": "ab"}, "finish_reason": "stop", "logprobs": {"content": content}}]}

    g = t._parse("r", response("token_id:11"))
    assert (g.token_ids, g.token_logprobs) == ([5, 6], [-0.1, -0.2])
    assert (g.top_ids, g.top_logprobs) == ([[5, 9], [6, 11]], [[-0.1, -2.0], [-0.2, -3.0]])
    g = t._parse("r", response(bad))
    assert g.text == "ab" and g.token_ids is g.token_logprobs is g.top_ids is g.top_logprobs is None


def test_max_tokens_truncation_reported(server):
    [g] = ask(teacher(server, sampling={"temperature": 0, "max_tokens": 2}), "a b c d e")
    assert g.finish_reason == "length" and g.completion_tokens == 2


def test_api_key_never_leaks(server, monkeypatch, capsys):
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    monkeypatch.setenv("FAKE_KEY", secret)
    server.inject("500", times=None)
    t = teacher(server, api_key_env="FAKE_KEY", max_attempts=2)
    [g] = ask(t, "hi")
    blob = json.dumps(g.to_dict()) + repr(t) + repr(t.cfg) + json.dumps(t.info()) + t.cfg.model_dump_json()
    out = capsys.readouterr()
    assert secret not in blob + out.out + out.err
    assert g.error.startswith("teacher.http_500")


def test_key_echoed_by_a_server_is_scrubbed(monkeypatch):
    secret = "sk-test-ECHOED-BY-PROXY-42"
    monkeypatch.setenv("FAKE_KEY", secret)
    with FakeOpenAIServer(answer=lambda m: "unused") as s:
        s.inject("400", times=None)
        t = teacher(s, api_key_env="FAKE_KEY", max_attempts=1)
        import datagen.testing.fake_openai as fo

        # A proxy that repeats the Authorization header in its error body.
        orig = fo.FakeOpenAIServer._serve

        def echo(self, h, body, fault):
            h._json(400, {"error": {"message": "bad key " + h.headers.get("authorization", "")}})

        monkeypatch.setattr(fo.FakeOpenAIServer, "_serve", echo)
        [g] = ask(t, "hi")
        monkeypatch.setattr(fo.FakeOpenAIServer, "_serve", orig)
    assert g.error.startswith("teacher.http_400") and "bad key" in g.error
    assert secret not in g.error and "***" in g.error


def test_sdk_telemetry_headers_are_not_sent(server, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sk-test-header")
    [g] = ask(teacher(server, api_key_env="FAKE_KEY"), "hi")
    assert g.error is None
    sent = server.last_headers
    assert sent["authorization"] == "Bearer sk-test-header"
    assert sent["user-agent"].startswith("AsyncOpenAI/Python")
    assert sent["content-type"] == "application/json"
    assert not [name for name in sent if name.startswith("x-stainless")], sent


def test_missing_key_env_is_a_clear_error(server, monkeypatch):
    from datagen.errors import ConfigError

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ConfigError, match="NO_SUCH_KEY_VAR is not set"):
        teacher(server, api_key_env="NO_SUCH_KEY_VAR")


def test_one_attempt_means_no_retry(server):
    # The first attempt runs outside tenacity; a failure there still follows its policy.
    server.inject("500", times=1)
    [g] = ask(teacher(server, max_attempts=1), "hi")
    assert g.error.startswith("teacher.http_500") and "after 1 attempts" in g.error
    assert g.attempts == 1 and server.requests == 1


def test_generation_dict_is_the_dataclass_fields():
    import dataclasses

    from datagen.teachers.base import Generation

    g = Generation(row_id="r", text="x", token_ids=[1, 2], top_ids=[[1, 3], [2, 4]], top_logprobs=[[-0.1, -2.0]] * 2)
    assert g.to_dict() == dataclasses.asdict(g)
    assert list(g.to_dict()) == [f.name for f in dataclasses.fields(g)]


def test_server_values_that_no_column_can_hold_are_refused_or_dropped(tmp_path):
    """A 2xx answer whose values are the wrong type or out of the columns' range: the row
    is still written, with what can be trusted (or fails with a reason, for text that is
    not Unicode); nothing reaches the Parquet writer that would stop the whole run."""
    from datagen import records
    from datagen.teachers.openai_api import MalformedResponse

    t = OpenAICompatibleTeacher(OpenAITeacher.model_validate({
        "name": "t", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
        "sampling": {"logprobs": 1}}))

    def answer(*, content="ok", finish=None, usage=None, token="token_id:5", logprob=-0.5):
        pos = {"token": token, "logprob": logprob, "bytes": None}
        return {"choices": [{"message": {"content": content}, "finish_reason": finish,
                             "logprobs": {"content": [{**pos, "top_logprobs": [pos]}]}}],
                "usage": usage or {}}

    gens = [
        t._parse("a", answer(finish=5)),
        t._parse("b", answer(finish={"why": "stop"})),
        t._parse("c", answer(usage={"prompt_tokens": 2**32 - 1, "completion_tokens": 3})),
        t._parse("d", answer(token="token_id:99999999999")),
        t._parse("e", answer(token="token_id:-1")),
        t._parse("f", answer(logprob=10**400)),
    ]
    assert gens[0].finish_reason is None and gens[1].finish_reason is None
    assert gens[2].prompt_tokens is None and gens[2].completion_tokens == 3  # unknown, not wrapped
    for g in gens[3:]:  # an id no vocabulary has, a log-prob no float holds: unavailable
        assert g.text == "ok" and g.token_ids is g.token_logprobs is g.top_ids is g.top_logprobs is None
    with pytest.raises(MalformedResponse, match="not valid Unicode"):
        t._parse("g", json.loads('{"choices": [{"message": {"content": "a\\ud800"}}]}'))

    rows = []
    for g in gens:
        row = records.empty_row()
        row.update(row_id=g.row_id, prompt_id="p", sample_index=0, messages=[{"role": "user", "content": "q"}],
                   response=g.text, finish_reason=g.finish_reason, token_ids=g.token_ids,
                   usage={"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                          "cost_usd": None})
        rows.append(row)
    assert records.to_table(rows).num_rows == len(gens)  # the writer's own conversion
