"""Teacher backends and the Ray actor that hosts one.

``TEACHERS`` is the registry: backend name (the job file's ``backend:``) -> the class
built inside the actor from the teacher's config. Backends import their heavy
dependencies when constructed, never at module import.
"""

from __future__ import annotations

from typing import Any

from datagen.config import OpenAITeacher, VLLMTeacher


def _vllm(cfg: VLLMTeacher):
    from datagen.teachers.vllm_engine import VLLMEngineTeacher

    return VLLMEngineTeacher(cfg)


def _openai(cfg: OpenAITeacher):
    from datagen.teachers.openai_api import OpenAICompatibleTeacher

    return OpenAICompatibleTeacher(cfg)


TEACHERS = {"vllm": _vllm, "openai": _openai}


def build(cfg: VLLMTeacher | OpenAITeacher):
    return TEACHERS[cfg.backend](cfg)


def _collect_less() -> None:
    """For an HTTP client's process (the actor's own): a request allocates hundreds of
    short-lived objects, so with Python's default thresholds (700 allocations) the
    collector ran every few requests and rescanned every long-lived object (Ray, the
    client, all imported modules) in its full passes. Freeze what exists after start-up
    and collect the young generation every 10,000 allocations: ~10% less CPU per
    request (benchmarks/bench_openai.py). Cycles are still collected, just in bigger batches."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


class TeacherActor:
    """Hosts one teacher backend; run as an async Ray actor (see ``runner``).

    Takes the teacher config as a plain dict so the actor's constructor arguments are
    data, and rebuilds the pydantic model on its side.
    """

    def __init__(self, cfg: dict[str, Any]):
        from pydantic import TypeAdapter

        from datagen.config import Teacher

        teacher = TypeAdapter(Teacher).validate_python(cfg)
        self.teacher = build(teacher)
        self._warm: Any = None  # the warm-up task, started by the first ``info`` call
        watch = getattr(self.teacher, "start_watchdog", None)
        if watch is not None:  # a vLLM engine that hangs: this actor exits, Ray restarts it
            watch()
        if teacher.backend == "openai":
            _collect_less()

    async def info(self) -> dict[str, Any]:
        """What the teacher is (provenance, batch size); answers once its engine is warm.

        The runner's first call (start-up) and its liveness pings both come here, so a
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
