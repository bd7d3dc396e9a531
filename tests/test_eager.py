"""The eager task factory (datagen/teachers/eager.py): inside its scope a task's first
step runs within create_task and the task then behaves as any task (results, errors,
cancellation, context); outside it, tasks are made as before."""

import asyncio
import contextvars
import sys

import pytest

from datagen.teachers import eager

pytestmark = pytest.mark.skipif(not eager.NEEDED, reason="Python >= 3.12: aiohttp starts its writer eagerly")

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("test_eager_var", default="unset")


def loops():
    yield asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        return
    yield uvloop.new_event_loop


@pytest.fixture(params=list(loops()), ids=lambda f: f.__module__.split(".")[0])
def run(request):
    def runner(main):
        loop = request.param()
        try:
            eager.install(loop)
            return loop.run_until_complete(main())
        finally:
            loop.close()
    return runner


async def sets_var_then_yields():
    """Sets VAR in its first step, suspends once, and returns what VAR then holds."""
    VAR.set("set in the first step")
    await asyncio.sleep(0)
    return VAR.get()


def run_on_loop_with_factory(factory, main, installs=1):
    """``main`` on a fresh asyncio loop that has ``factory`` before the eager one."""
    loop = asyncio.new_event_loop()
    try:
        loop.set_task_factory(factory)
        for _ in range(installs):
            eager.install(loop)
        return loop.run_until_complete(main())
    finally:
        loop.close()


def test_in_scope_the_first_step_runs_inside_create_task(run):
    log = []

    async def child():
        log.append("first step")
        await asyncio.sleep(0.01)
        log.append("after suspending")
        return 7

    async def main():
        eager.eager_tasks()
        task = asyncio.ensure_future(child())
        log.append("create_task returned")
        assert not task.done()
        return await task

    assert run(main) == 7
    assert log == ["first step", "create_task returned", "after suspending"]


def test_out_of_scope_tasks_start_later_as_before(run):
    log = []

    async def child():
        log.append("first step")

    async def main():
        task = asyncio.get_running_loop().create_task(child())
        log.append("create_task returned")
        await task
        assert isinstance(task, asyncio.Task)

    run(main)
    assert log == ["create_task returned", "first step"]


def test_a_task_done_in_its_first_step_comes_back_done(run):
    async def child():
        return "at once"

    async def failing():
        raise KeyError("boom")

    async def main():
        eager.eager_tasks()
        ok, bad = asyncio.ensure_future(child()), asyncio.ensure_future(failing())
        assert ok.done() and ok.result() == "at once"
        assert bad.done()
        with pytest.raises(KeyError):
            await bad

    run(main)


def test_errors_values_and_cancellation_after_the_first_step(run):
    cleaned = []

    async def raises_later():
        await asyncio.sleep(0)
        raise ValueError("later")

    async def echo(fut):
        return await fut

    async def sleeper():
        try:
            await asyncio.sleep(30)
        finally:
            cleaned.append("finally ran")

    async def main():
        eager.eager_tasks()
        with pytest.raises(ValueError, match="later"):
            await asyncio.ensure_future(raises_later())
        fut = asyncio.get_running_loop().create_future()
        waiting = asyncio.ensure_future(echo(fut))
        fut.set_result("passed through")
        assert await waiting == "passed through"
        slow = asyncio.ensure_future(sleeper())
        await asyncio.sleep(0)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert slow.cancelled()

    run(main)
    assert cleaned == ["finally ran"]


def test_the_task_keeps_one_context_across_its_first_step(run):
    async def main():
        eager.eager_tasks()
        VAR.set("parent")
        got = await asyncio.ensure_future(sets_var_then_yields())
        assert VAR.get() == "parent"  # a copy, as for any task
        return got

    assert run(main) == "set in the first step"


def test_install_chains_the_factory_already_there():
    made = []

    def factory(loop, coro, **kwargs):
        made.append(coro.__qualname__.rpartition(".")[2] if "<locals>" in coro.__qualname__ else coro.__qualname__)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def child():
        await asyncio.sleep(0)
        return 1

    async def main():
        plain = await asyncio.ensure_future(child())
        eager.eager_tasks()
        eager_one = await asyncio.ensure_future(child())
        return plain + eager_one

    assert run_on_loop_with_factory(factory, main, installs=2) == 2  # installed once only
    # main itself, the plain child, and the rest of the eager child after its first step
    assert made == ["main", "child", "child"]


def test_a_factory_that_takes_no_context_is_still_chained():
    made = []

    def old_style(loop, coro):  # (loop, coro), as factories written before 3.11 are
        made.append(coro)
        return asyncio.Task(coro, loop=loop)

    async def main():
        eager.eager_tasks()
        return await asyncio.ensure_future(sets_var_then_yields())

    assert run_on_loop_with_factory(old_style, main) == "set in the first step"
    assert len(made) == 2  # main, and the eager child's continuation


def test_a_cancel_before_the_task_resumes_reaches_the_coroutine_at_once(run):
    """Cancelled between its eager first step and the task's first turn: the coroutine
    gets the CancelledError at its await then (its cleanup runs before the caller goes
    on), not at garbage collection."""
    log = []

    async def child():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            log.append("saw the cancel")
            raise
        finally:
            log.append("cleaned up")

    async def main():
        eager.eager_tasks()
        task = asyncio.ensure_future(child())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        log.append("caller goes on")
        assert task.cancelled()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(child(), 0)

    run(main)
    assert log == ["saw the cancel", "cleaned up", "caller goes on", "saw the cancel", "cleaned up"]


def test_exit_in_a_first_step_is_not_swallowed(run):
    async def child():
        raise SystemExit(3)

    async def main():
        eager.eager_tasks()
        asyncio.ensure_future(child())

    with pytest.raises(SystemExit):
        run(main)


def test_the_openai_teacher_installs_it_and_sends_bodies_eagerly():
    """The one task the teacher's HTTP call spawns (aiohttp's body writer) starts eagerly."""
    from datagen.config import OpenAITeacher
    from datagen.teachers.openai_api import OpenAICompatibleTeacher
    from datagen.testing.fake_openai import FakeOpenAIServer

    spawned = []
    original = eager._Factory.__call__

    def spy(self, loop, coro, **kwargs):
        if eager._EAGER.get():
            spawned.append(coro.__qualname__)
        return original(self, loop, coro, **kwargs)

    with FakeOpenAIServer() as server:
        teacher = OpenAICompatibleTeacher(OpenAITeacher.model_validate({
            "name": "t", "backend": "openai", "model": "fake", "base_url": server.base_url}))

        async def main():
            rows = await teacher.generate([{"row_id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"}],
                                            "seed": i} for i in range(5)])
            assert isinstance(asyncio.get_running_loop().get_task_factory(), eager._Factory)
            await teacher.aclose()
            return rows

        eager._Factory.__call__ = spy
        try:
            rows = asyncio.run(main())
        finally:
            eager._Factory.__call__ = original
    assert [r.error for r in rows] == [None] * 5
    assert spawned and all(name.endswith("write_bytes") for name in spawned), spawned
    assert sys.version_info < (3, 12)
