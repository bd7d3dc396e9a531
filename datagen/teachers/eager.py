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
import collections.abc
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
        given = kwargs.pop("context", None)
        context = contextvars.copy_context() if given is None else given
        try:
            waiting_on = context.run(coro.send, None)
        except StopIteration as stop:  # done without suspending: no task to schedule
            done = loop.create_future()
            done.set_result(stop.value)
            return done
        except asyncio.CancelledError as exc:
            done = loop.create_future()
            done.cancel(*exc.args[:1])
            return done
        except BaseException as exc:  # the task's outcome, as a task would hold it
            done = loop.create_future()
            done.set_exception(exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise  # as a task's step re-raises them
            return done
        resumed = _Resumed(coro, waiting_on)
        if given is not None:
            return self._task(loop, resumed, context=context, **kwargs)
        # A factory called without a context may not take one; the task copies this
        # context, which holds what the first step set.
        return context.run(self._task, loop, resumed, **kwargs)


class _Resumed(collections.abc.Coroutine):
    """``coro`` after its eager first step, suspended on ``waiting_on``, for the task that
    drives it on: the task's first ``send`` gets back what the first step waits on; every
    later send, any ``throw`` (a cancel before that first send too) and ``close`` go
    straight to ``coro``."""

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting_on: Any):
        self._coro, self._waiting_on, self._fresh = coro, waiting_on, True
        self.__name__ = getattr(coro, "__name__", type(coro).__name__)
        self.__qualname__ = getattr(coro, "__qualname__", self.__name__)

    def send(self, value: Any) -> Any:
        if self._fresh:
            self._fresh = False
            waiting_on, self._waiting_on = self._waiting_on, None
            return waiting_on
        return self._coro.send(value)

    def throw(self, *exc: Any) -> Any:
        if self._fresh and isinstance(self._waiting_on, asyncio.Future):
            self._waiting_on.cancel()  # what it waited on, no task will wait on now (as Task.cancel)
        self._fresh, self._waiting_on = False, None
        return self._coro.throw(*exc)

    def close(self) -> None:
        self._fresh, self._waiting_on = False, None
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, Any]:  # awaited directly rather than run by a task
        step, arg = self.send, None
        while True:
            try:
                pending = step(arg)
            except StopIteration as stop:
                return stop.value
            try:
                arg, step = (yield pending), self.send
            except GeneratorExit:
                self.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - thrown in: pass it on
                arg, step = exc, self.throw
