"""``TeacherActor``: the Ray actor that hosts one teacher backend (``fleet.py`` starts them)."""

from __future__ import annotations

from typing import Any


class TeacherActor:
    """Hosts one teacher backend; run as an async Ray actor (see ``fleet.py``).

    Takes the teacher config as a plain dict so the actor's constructor arguments are
    data, and rebuilds the pydantic model on its side.
    """

    def __init__(self, cfg: dict[str, Any]):
        from pydantic import TypeAdapter

        from datagen.teachers import build
        from datagen.teachers.spec import Teacher

        teacher = TypeAdapter(Teacher).validate_python(cfg)
        self.teacher = build(teacher)
        self._warm: Any = None  # the warm-up task, started by the first ``info`` call
        in_actor = getattr(self.teacher, "in_actor", None)
        if in_actor is not None:  # what a backend does in its own process (a watchdog, GC settings)
            in_actor()

    async def info(self) -> dict[str, Any]:
        """What the teacher is (provenance, batch size); answers once its engine is warm.

        The fleet's first call (start-up, ``TeacherFleet.wait_started``) and its liveness pings both come here, so a
        replica counts as started, or back after a restart, only when it can take a batch
        at full speed. Warm-up runs on the actor's own event loop, where the engine's
        output handler must live. API teachers have none: nothing is sent to a provider."""
        await self._warmed()
        return self.teacher.info()

    async def _warmed(self) -> None:
        """Warm-up runs once, before this actor's first answer of any kind: after a restart,
        Ray re-sends the batches it held before the driver's ping arrives."""
        import asyncio

        warmup = getattr(self.teacher, "warmup", None)
        if warmup is not None:
            if self._warm is None:
                self._warm = asyncio.ensure_future(warmup())
            await asyncio.shield(self._warm)  # concurrent callers share one warm-up

    async def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        await self._warmed()
        return [g.to_dict() for g in await self.teacher.generate(requests)]

    async def rescore(self, requests: list[dict[str, Any]], *, k: int) -> list[dict[str, Any]]:
        """Teacher-forced top-k over given responses (``datagen rescore``); vLLM only."""
        await self._warmed()
        return [g.to_dict() for g in await self.teacher.rescore(requests, k=k)]
