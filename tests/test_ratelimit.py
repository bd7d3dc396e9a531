"""The limiter on its own, on a fake clock: slow start, AIMD cuts (once per episode),
the latency signal, Retry-After pauses, request/token budgets and their correction.
(Through a real HTTP server: tests/test_openai_teacher.py.)"""

from __future__ import annotations

import asyncio

import pytest

from datagen.teachers.ratelimit import LATENCY_WARMUP, SLOW_START, Limiter, TokenBucket


class Clock:
    """Time that moves only when someone sleeps."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.t += s
        await asyncio.sleep(0)


def limiter(clock: Clock, **kw) -> Limiter:
    kw.setdefault("max_concurrency", 32)
    return Limiter(clock=clock, sleep=clock.sleep, **kw)


def run(coro):
    return asyncio.run(coro)


def test_slow_start_doubles_then_ramps_additively_to_the_ceiling():
    async def go():
        c = Clock()
        lim = limiter(c)
        assert lim.limit == SLOW_START
        for _ in range(SLOW_START):  # one round trip of successes: doubled
            lim.release(await lim.acquire(), ok=True)
        assert lim.limit == 2 * SLOW_START
        lim.release(await lim.acquire(), ok=False, congestion="429")
        assert lim.limit == SLOW_START and lim.cuts == {"429": 1}
        before = lim.limit
        for _ in range(int(before)):  # after a cut: about +1 per round trip
            lim.release(await lim.acquire(), ok=True)
        assert before + 0.5 < lim.limit < before + 1.5
        for _ in range(2000):
            lim.release(await lim.acquire(), ok=True)
        assert lim.limit == 32  # back up to the ceiling, never past it

    run(go())


def test_a_congestion_episode_cuts_once():
    async def go():
        lim = limiter(Clock(), adaptive=True)
        lim.limit = 16.0
        tickets = [await lim.acquire() for _ in range(6)]  # all on the wire before any reply
        for t in tickets:
            lim.release(t, ok=False, congestion="429")
        assert lim.limit == 8 and lim.cuts["429"] == 1
        lim.release(await lim.acquire(), ok=False, congestion="timeout")  # sent after the cut
        assert lim.limit == 4 and lim.cuts["timeout"] == 1

    run(go())


def test_floor_and_fixed_mode():
    async def go():
        lim = limiter(Clock(), min_concurrency=3)
        for _ in range(10):
            lim.release(await lim.acquire(), ok=False, congestion="503")
        assert lim.limit == 3
        fixed = limiter(Clock(), adaptive=False)
        for _ in range(10):
            fixed.release(await fixed.acquire(), ok=False, congestion="429")
        assert fixed.limit == 32 and not fixed.cuts

    run(go())


def test_rising_latency_cuts_without_any_429():
    async def go():
        c = Clock()
        lim = limiter(c, latency_ratio=2.0)

        async def request(seconds: float) -> None:
            t = await lim.acquire()
            c.t += seconds
            lim.release(t, ok=True)

        for _ in range(LATENCY_WARMUP + 4):
            await request(0.1)
        high = lim.limit
        assert not lim.cuts
        for _ in range(10):
            await request(0.5)  # the server is queueing: five times slower
        assert lim.cuts["latency"] >= 1 and lim.limit < high

        c2 = Clock()
        quiet = limiter(c2, latency_ratio=None)  # latency signal off
        for s in [0.1] * 12 + [0.5] * 10:
            t = await quiet.acquire()
            c2.t += s
            quiet.release(t, ok=True)
        assert not quiet.cuts

    run(go())


def test_long_answers_are_not_congestion():
    # Same time per token, answers from 2 to 400 tokens: no cut. Per-request latency
    # would have read every long answer as a 200x slowdown.
    async def go():
        c = Clock()
        lim = limiter(c, latency_ratio=2.0)
        for i in range(200):
            n = 2 if i < 20 else 2 + (i * 37) % 400
            t = await lim.acquire()
            c.t += 0.01 * n + 0.001
            lim.release(t, ok=True, generated=n)
        assert not lim.cuts and lim.limit == 32

    run(go())


def test_concurrency_is_a_hard_bound_and_a_cancelled_waiter_frees_nothing():
    async def go():
        lim = limiter(Clock(), adaptive=False, max_concurrency=2)
        a, b = await lim.acquire(), await lim.acquire()
        waiter = asyncio.ensure_future(lim.acquire())
        cancelled = asyncio.ensure_future(lim.acquire())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not waiter.done() and lim.inflight == 2
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        lim.release(a, ok=True)
        c = await waiter
        assert lim.inflight == 2
        lim.release(b, ok=True)
        lim.release(c, ok=True)
        assert lim.inflight == 0 and not lim._waiters

    run(go())


def test_retry_after_pauses_every_request_of_the_replica():
    async def go():
        c = Clock()
        lim = limiter(c)
        t = await lim.acquire()
        other = await lim.acquire()
        lim.release(t, ok=False, congestion="429", retry_after=3.0)
        lim.release(other, ok=True)  # an unrelated request: no pause of its own
        nxt = await lim.acquire()
        assert nxt.started >= 3.0

    run(go())


def test_request_budget_paces_instead_of_bursting():
    async def go():
        c = Clock()
        lim = limiter(c, adaptive=False, requests_per_minute=120)  # 2/s, bucket holds 2
        starts = []
        for _ in range(6):
            t = await lim.acquire()
            starts.append(t.started)
            lim.release(t, ok=True)
        assert starts == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.5, 2.0])

    run(go())


def test_token_budget_uses_the_estimate_then_the_reported_usage():
    async def go():
        c = Clock()
        lim = limiter(c, adaptive=False, tokens_per_minute=600)  # 10 tokens/s, bucket holds 10
        t = await lim.acquire(tokens=10)
        lim.release(t, ok=True, used_tokens=2)  # the server says it was 2: 8 come back
        t2 = await lim.acquire(tokens=10)
        assert t2.started == pytest.approx(0.2)  # waited only for the 2 it really used
        lim.release(t2, ok=True, used_tokens=30)  # under-estimated: 20 more are owed
        t3 = await lim.acquire(tokens=10)
        assert t3.started == pytest.approx(0.2 + 3.0)  # 30 tokens of debt at 10/s
        # A request bigger than the whole bucket still passes once it is full.
        lim.release(t3, ok=True)
        big = await lim.acquire(tokens=500)
        assert big.started == pytest.approx(t3.started + 1.0)

    run(go())


def test_an_impossible_usage_report_owes_at_most_a_minute():
    async def go():
        c = Clock()
        lim = limiter(c, adaptive=False, tokens_per_minute=600)  # 10 tokens/s
        t = await lim.acquire(tokens=10)
        lim.release(t, ok=True, used_tokens=2**32 - 1)  # a server's unsigned wrap-around
        t2 = await lim.acquire(tokens=10)
        assert t2.started == pytest.approx(60.0 + 1.0)  # a minute of debt, then one bucket; not 13 years

    run(go())


def test_token_bucket_never_overfills():
    b = TokenBucket(60, now=0.0)  # 1/s, holds 1
    b.give(100)
    assert b.level == 1.0
    assert b.delay(1, now=0.0) == 0.0
    b.take(1)
    assert b.delay(1, now=0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("field,value,needle", [
    ("min_concurrency", 9, "teachers[0].min_concurrency: must not be above max_concurrency (8) (got 9)"),
    ("requests_per_minute", 0, "teachers[0].requests_per_minute: Input should be greater than 0"),
    ("tokens_per_minute", -5, "teachers[0].tokens_per_minute: Input should be greater than or equal to 1"),
    ("latency_backoff", 1.0, "teachers[0].latency_backoff: Input should be greater than 1"),
    ("price", {"input_per_mtok": 1.0}, "teachers[0].price.output_per_mtok: required field is missing"),
    ("price", {"input_per_mtok": -1, "output_per_mtok": 1}, "teachers[0].price.input_per_mtok: Input should be"),
])
def test_flow_control_and_price_fields_are_validated(tmp_path, field, value, needle):
    from datagen.config import parse_job
    from datagen.errors import ConfigError

    teacher = {"name": "api", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
               "max_concurrency": 8, field: value}
    job = {"name": "t", "prompts": {"template": "t.yaml"}, "teachers": [teacher], "output": {"path": "out"}}
    with pytest.raises(ConfigError) as err:
        parse_job(job, where="job.yaml", base_dir=tmp_path)
    assert f"job.yaml: {needle}" in str(err.value)
