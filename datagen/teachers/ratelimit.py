"""Client-side flow control for one teacher replica: request and token budgets, and
adaptive concurrency. A teacher's budgets and concurrency are set for the whole teacher
(one API key); each of its ``replicas`` gets an even, static share
(``OpenAITeacher.for_replica``), and its ``Limiter`` enforces that share.

Every HTTP attempt (retries included) takes a ticket from a ``Limiter`` before it is
sent and hands it back with what happened. Three things can hold an attempt back:

- **Concurrency.** At most ``limit`` attempts are in flight. The limit moves AIMD-style,
  as TCP's congestion window does:
  - it starts small and grows by one per success (slow start, doubling per round
    trip) until the first sign of congestion or ``max_concurrency``;
  - after that it grows by one per round trip (``+1/limit`` per success);
  - it is cut multiplicatively on congestion: a 429, a 503 or a time-out (halved), or
    smoothed latency above ``latency_ratio`` x its baseline (cut by a quarter).
    Self-hosted servers never send 429s; queueing shows up as latency first.
    Latency is taken per generated token (seconds / completion tokens, when the server
    reports them): queueing and over-full batches stretch that, while a long answer
    alone does not, so mixed answer lengths are not read as congestion.
  One congestion episode cuts once: only an attempt that started after the last cut
  may cut again (the replies of attempts already on the wire describe the old limit).
- **Pauses.** A ``Retry-After`` pauses the whole replica, not just the request that
  got it: every other attempt would hit the same wall.
- **Budgets.** ``requests_per_minute`` and ``tokens_per_minute`` are token buckets
  that refill continuously and hold one second's worth, so traffic is paced rather
  than sent in a burst at the top of each minute (providers enforce sub-minute
  windows too). A request's tokens are estimated before it is sent (prompt characters
  / 4 + ``max_tokens``) and corrected with the usage the server reports (by at most one
  minute's budget). A request bigger than the bucket still passes once the bucket is
  full, and leaves it in debt.

Not covered:
- the split between replicas is static: a replica whose share is idle does not lend
  it to a busy one, and each replica's bucket holds one second of its own share (at
  least one request), so a tiny budget over many replicas bursts a little more;
- a judge filter that grades with the teacher runs its own client per filter actor,
  the actors splitting the teacher's budgets evenly; that comes on top of what the
  teacher's generation replicas use (no limiter is shared across processes);
- the latency baseline is the lowest smoothed latency seen, creeping up by 0.1% a
  request so that a server that is simply slower now (longer prompts or answers)
  becomes the new normal instead of pinning the limit low; until it has crept up,
  such a change reads as congestion;
- latency is measured by the client, so a client starved of CPU looks like a slow
  server and backs off too (``latency_backoff: null`` turns the signal off).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

SLOW_START = 4  # first limit: enough to learn the server's unloaded latency
CONGESTION_CUT = 0.5  # 429, 503, time-out: the server said no
LATENCY_CUT = 0.75  # latency only suggests queueing: a gentler cut
EWMA_ALPHA = 0.2  # smoothing of per-attempt latency
LATENCY_WARMUP = 8  # successes before the latency signal is trusted
BASELINE_DRIFT = 0.001  # per success; see "Not covered" above


class TokenBucket:
    """``per_minute`` units a minute, refilled continuously, holding at most one
    second's worth (but at least one unit)."""

    def __init__(self, per_minute: float, *, now: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay(self, need: float, now: float) -> float:
        """Seconds until ``need`` units may be taken (never more than a full bucket)."""
        self._refill(now)
        want = min(need, self.capacity)
        return 0.0 if self.level >= want else (want - self.level) / self.rate

    def take(self, n: float) -> None:
        self.level -= n  # may go negative: a big request leaves the bucket in debt

    def give(self, n: float) -> None:
        """Correct an estimate: ``n`` > 0 returns over-estimated units, < 0 takes more.

        A correction owes at most one minute's budget: no provider serves one request
        bigger than its per-minute limit, so a larger reported usage is a server's bug
        (an unsigned wrap-around reads as 4e9 tokens), and honouring it would stall the
        replica for days."""
        floor = min(self.level, -self.rate * 60)
        self.level = max(floor, min(self.capacity, self.level + n))


@dataclass
class Ticket:
    started: float
    epoch: int
    tokens: int


class Limiter:
    """Flow control for one replica; lives on one event loop."""

    def __init__(self, *, max_concurrency: int, min_concurrency: int = 1, adaptive: bool = True,
                 requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 latency_ratio: float | None = 2.5, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.max = max_concurrency
        self.min = min(min_concurrency, max_concurrency)
        self.adaptive = adaptive
        self.latency_ratio = latency_ratio
        self.clock, self.sleep = clock, sleep
        self.limit = float(min(SLOW_START, self.max) if adaptive else self.max)
        self.slow_start = adaptive
        self.inflight = 0
        self.epoch = 0  # bumped on every cut
        self.cuts: Counter[str] = Counter()  # reason -> cuts, for tests and logs
        self.ewma: float | None = None
        self.baseline: float | None = None
        self._ok = 0
        self._pause_until = 0.0
        now = clock()
        self.rpm = TokenBucket(requests_per_minute, now=now) if requests_per_minute else None
        self.tpm = TokenBucket(tokens_per_minute, now=now) if tokens_per_minute else None
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._gate_lock = asyncio.Lock()

    # -- taking and returning a slot -------------------------------------------------------
    async def acquire(self, *, tokens: int = 0) -> Ticket:
        if self._waiters or self.inflight >= int(self.limit):
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut  # whoever resolved it counted this attempt in
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._free()
                else:
                    try:
                        self._waiters.remove(fut)
                    except ValueError:
                        pass
                raise
        else:
            self.inflight += 1
        try:
            await self._gate(tokens)
        except BaseException:
            self._free()
            raise
        return Ticket(self.clock(), self.epoch, tokens)

    async def _gate(self, tokens: int) -> None:
        """Wait out a pause and the budgets. One waiter at a time (FIFO), so a crowd
        does not wake together and race for the same refill."""
        if self.rpm is None and self.tpm is None and self._pause_until <= self.clock():
            return
        async with self._gate_lock:
            while True:
                now = self.clock()
                wait = max(self._pause_until - now,
                           self.rpm.delay(1, now) if self.rpm else 0.0,
                           self.tpm.delay(tokens, now) if self.tpm else 0.0)
                if wait <= 0:
                    break
                await self.sleep(wait)
            if self.rpm:
                self.rpm.take(1)
            if self.tpm:
                self.tpm.take(tokens)

    def _free(self) -> None:
        self.inflight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.inflight < int(self.limit):
            fut = self._waiters.popleft()
            if fut.done():  # cancelled while waiting
                continue
            self.inflight += 1
            fut.set_result(None)

    # -- what happened -----------------------------------------------------------------------
    def release(self, ticket: Ticket, *, ok: bool, used_tokens: int | None = None,
                generated: int | None = None, congestion: str | None = None,
                retry_after: float | None = None) -> None:
        """Return a slot. ``ok``: the attempt got a usable answer (its latency per
        ``generated`` token feeds the latency signal); ``congestion`` names the server's
        push-back ("429", "503", "timeout"); ``retry_after`` pauses the replica;
        ``used_tokens`` (the usage the server reported) corrects the token estimate."""
        if self.tpm is not None and used_tokens is not None:
            self.tpm.give(ticket.tokens - used_tokens)
        if retry_after:
            self._pause_until = max(self._pause_until, self.clock() + retry_after)
        if self.adaptive:
            if congestion is not None:
                self._cut(ticket, congestion, CONGESTION_CUT)
            elif ok:
                self._observe(ticket, (self.clock() - ticket.started) / max(1, generated or 1))
        self._free()

    def _observe(self, ticket: Ticket, latency: float) -> None:
        self._ok += 1
        self.ewma = latency if self.ewma is None else self.ewma + EWMA_ALPHA * (latency - self.ewma)
        if self._ok <= LATENCY_WARMUP or self.baseline is None:
            self.baseline = self.ewma if self.baseline is None else min(self.baseline, self.ewma)
        else:
            self.baseline = min(self.ewma, self.baseline * (1 + BASELINE_DRIFT))
        if (self.latency_ratio is not None and self._ok > LATENCY_WARMUP
                and self.ewma > self.latency_ratio * self.baseline):
            self._cut(ticket, "latency", LATENCY_CUT)
            return
        grow = 1.0 if self.slow_start else 1.0 / self.limit
        self.limit = min(float(self.max), self.limit + grow)
        if self.limit >= self.max:
            self.slow_start = False

    def _cut(self, ticket: Ticket, reason: str, factor: float) -> None:
        self.slow_start = False
        if ticket.epoch != self.epoch:
            return  # started before the last cut: same episode
        self.epoch += 1
        self.cuts[reason] += 1
        self.limit = max(float(self.min), self.limit * factor)
