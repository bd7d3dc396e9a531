"""Eager start for the tasks a teacher's HTTP call spawns, on Python 3.11.

aiohttp (the openai client's transport here) sends a request's body from a task of its
own. On Python >= 3.12 it starts that task eagerly, so a small body leaves inside the
call that built it. On 3.11 the task's first step waits its turn in the event loop's
ready queue, behind every callback already there, and under load that changes the
traffic's shape:

- a burst of answers arrives; each answer's task parses it and builds the next request;
- every one of those requests then waits for the whole burst to be parsed and built
  before any of them is written;
- so they leave together and come back together a round trip later: the bursts never
  disperse, and every request pays for its whole burst.

Against the 100 ms fake server at 128 in flight in one process
(``benchmarks/bench_openai.py --replicas 0 --inflight 128``) a request held its slot 108 ms
on average and throughput was 0.90 of the ideal; with the writer started eagerly, each
request leaves as soon as it is built: 101.6 ms and 0.97.

``install(loop)`` puts a task factory on the loop that starts a task eagerly, as
Python 3.12's ``asyncio.eager_task_factory`` does, but only for tasks created inside
``eager_tasks()`` (a context variable: the teacher's request tasks and what they spawn);
every other task on the loop, Ray's included, is created as before by the factory that
was there. One difference from 3.12's eager tasks: during the eager first step
``asyncio.current_task()`` is still the creating task. On Python >= 3.12 ``install`` does
nothing: aiohttp already starts its writer eagerly.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from collections.abc import Coroutine, Generator
from typing import Any

_EAGER: contextvars.ContextVar[bool] = contextvars.ContextVar("datagen_eager_tasks", default=False)
NEEDED = sys.version_info < (3, 12)


def eager_tasks() -> None:
    """From now on in the current context (a task's own), tasks start eagerly on loops
    that have the factory installed."""
    if NEEDED and not _EAGER.get():
        _EAGER.set(True)


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Put the eager factory on ``loop``, once, in front of the factory already there."""
    if not NEEDED or isinstance(loop.get_task_factory(), _Factory):
        return
    loop.set_task_factory(_Factory(loop.get_task_factory()))


class _Factory:
    def __init__(self, inner: Any):
        self.inner = inner  # the loop's previous factory, or None for plain tasks

    def _task(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        if self.inner is not None:
            return self.inner(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                 **kwargs: Any) -> asyncio.Future[Any]:
        if not _EAGER.get():
            return self._task(loop, coro, **kwargs)
        # The first step runs now, in the context the task would have had.
        context = kwargs.pop("context", None)
        if context is None:
            context = contextvars.copy_context()
        try:
            waiting_on = context.run(coro.send, None)
        except StopIteration as stop:  # done without suspending: no task to schedule
            done = loop.create_future()
            done.set_result(stop.value)
            return done
        except asyncio.CancelledError:
            done = loop.create_future()
            done.cancel()
            return done
        except BaseException as exc:  # noqa: BLE001 - the task's outcome, as a task would hold it
            done = loop.create_future()
            done.set_exception(exc)
            return done
        return self._task(loop, _Resumed(coro, waiting_on).run(), context=context, **kwargs)


class _Resumed:
    """A coroutine suspended after its first step, driven on from there by a task."""

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting_on: Any):
        self.coro, self.waiting_on = coro, waiting_on

    async def run(self) -> Any:
        return await self

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, pending = self.coro, self.waiting_on
        self.coro = self.waiting_on = None
        while True:
            # The task waits on what the coroutine yielded (a future, or None: a bare
            # yield), then hands the outcome back in: a value, or an exception (cancel).
            try:
                value = yield pending
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - thrown in by the task: pass it on
                step, arg = coro.throw, exc
            else:
                step, arg = coro.send, value
            try:
                pending = step(arg)
            except StopIteration as stop:
                return stop.value
