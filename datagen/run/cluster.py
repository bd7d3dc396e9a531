"""Joining Ray and leaving it cleanly: ``init_ray`` (a cluster or a local instance),
``check_resources`` (actors that could never be placed are refused up front), and
``StopFlag`` (SIGINT/SIGTERM end a run between batches). Shared by ``run``,
``rescore`` and the benchmarks. Not covered: Ray's own daemons and logs.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from datagen.errors import DatagenError, MissingExtra
from datagen.teachers.spec import TeacherSpec


def init_ray(runtime: Any) -> bool:
    """Join ``runtime.ray_address`` (or $RAY_ADDRESS), else start a local instance.
    True when this call started Ray (so the caller shuts it down)."""
    try:
        import ray
    except ImportError:
        raise MissingExtra("ray", "cpu", "datagen run") from None
    if ray.is_initialized():
        return False
    address = runtime.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "configure_logging": True,
                              "log_to_driver": bool(os.environ.get("DATAGEN_VERBOSE"))}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
        if runtime.num_cpus:
            kwargs["num_cpus"] = runtime.num_cpus
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise DatagenError(f"could not start or join {where}: {' '.join(str(exc).split())[:300]}") from None
    return True


def check_resources(teachers: list[TeacherSpec]) -> None:
    """Refuse, naming the shortfall, a job whose actors can never all be placed."""
    import ray

    have = ray.cluster_resources()
    need = {"CPU": 0.0, "GPU": 0.0}
    for t in teachers:
        need["CPU"] += t.num_cpus * t.replicas
        need["GPU"] += t.gpus * t.replicas
    for res, amount in need.items():
        if amount > have.get(res, 0.0) + 1e-9:
            raise DatagenError(
                f"the teachers need {amount:g} {res} in all (replicas x num_{res.lower()}s) but the "
                f"Ray cluster has {have.get(res, 0.0):g}; lower replicas or num_{res.lower()}s"
            )


class StopFlag:
    """SIGINT/SIGTERM set a flag that the driver loop checks between batches, so an
    interrupt never lands in the middle of a shard write. A second signal interrupts at
    once (KeyboardInterrupt), for a run that is stuck."""

    def __init__(self) -> None:
        self.set = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self) -> StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():  # signals reach only it
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
