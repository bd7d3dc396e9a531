"""``TeacherActor.info``: the call the fleet waits on at start-up and pings after a
restart answers only once the backend's warm-up is done, once, however many ask."""

from __future__ import annotations

import asyncio

import pytest

from datagen.teachers.actor import TeacherActor


class Backend:
    def __init__(self, fail: bool = False):
        self.warmups = 0
        self.fail = fail
        self.release = asyncio.Event()

    async def warmup(self) -> None:
        self.warmups += 1
        await self.release.wait()
        if self.fail:
            raise RuntimeError("engine could not generate")

    def info(self) -> dict:
        return {"name": "t", "warm": self.release.is_set()}


def _actor(backend) -> TeacherActor:
    actor = TeacherActor.__new__(TeacherActor)  # the backend, without building one from a config
    actor.teacher, actor._warm = backend, None
    return actor


def test_info_waits_for_one_warm_up_shared_by_every_caller():
    async def go():
        backend = Backend()
        actor = _actor(backend)
        calls = [asyncio.ensure_future(actor.info()) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(c.done() for c in calls)  # nobody hears "ready" from a cold engine
        backend.release.set()
        answers = await asyncio.gather(*calls)
        assert answers == [{"name": "t", "warm": True}] * 3 and backend.warmups == 1
        assert await actor.info() == {"name": "t", "warm": True} and backend.warmups == 1
    asyncio.run(go())


def test_a_cancelled_caller_leaves_the_warm_up_running():
    """A caller that gives up (a timed-out ping) does not cancel the warm-up for the others."""

    async def go():
        backend = Backend()
        actor = _actor(backend)
        first = asyncio.ensure_future(actor.info())
        await asyncio.sleep(0.01)
        first.cancel()
        second = asyncio.ensure_future(actor.info())
        backend.release.set()
        assert (await second)["warm"] and backend.warmups == 1
    asyncio.run(go())


def test_a_failed_warm_up_is_the_answer():
    async def go():
        backend = Backend(fail=True)
        backend.release.set()
        actor = _actor(backend)
        with pytest.raises(RuntimeError, match="could not generate"):
            await actor.info()
    asyncio.run(go())


def test_backends_without_a_warm_up_answer_at_once():
    class Api:
        def info(self):
            return {"name": "api"}

    assert asyncio.run(_actor(Api()).info()) == {"name": "api"}
