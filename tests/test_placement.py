"""Multi-GPU vLLM engines through Ray placement groups, on Ray's resource emulation.

CI has no GPU, so a local Ray instance is told it has 4 (``num_gpus=4``): Ray schedules
against declared resources, so the placement and the scheduling strategy are real; only
the vLLM engine, which would need the GPUs, is not started. What vLLM does next is read
``ray.util.get_current_placement_group()`` in the actor and put one worker in each GPU
bundle (vllm/v1/executor/ray_utils.py), which the probe actor below checks it can see.
"""

from __future__ import annotations

import pytest
import ray

from datagen.config import VLLMTeacher
from datagen.errors import ConfigError


def _teacher(tp: int = 2, pp: int = 1, **kw) -> VLLMTeacher:
    return VLLMTeacher.model_validate({
        "name": "big", "backend": "vllm", "model": "org/some-70b", "num_gpus": tp * pp, "num_cpus": 1,
        "engine": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp}, **kw,
    })


@pytest.fixture(scope="module")
def emulated_gpus():
    ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@ray.remote
class Probe:
    def where(self):
        pg = ray.util.get_current_placement_group()
        return {"bundles": pg.bundle_specs if pg else None,
                "gpus": ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)}


def test_tensor_parallel_engine_gets_one_packed_group_of_gpu_bundles(emulated_gpus):
    from datagen.teachers.fleet import placement_for, placement_options

    t = _teacher(tp=2)
    group = placement_for(t)
    assert ray.get(group.ready(), timeout=30)
    assert group.bundle_specs == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}]
    seen = ray.get(Probe.options(**placement_options(t, group)).remote().where.remote(), timeout=30)
    # The actor sees the group vLLM will use, and holds none of its GPUs itself.
    assert seen["bundles"] == group.bundle_specs and seen["gpus"] == 0.0
    ray.util.remove_placement_group(group)


def test_groups_beyond_the_cluster_stay_pending(emulated_gpus):
    """Two TP=2 engines fit 4 GPUs; a third waits (the fleet's startup timeout names it)."""
    from datagen.teachers.fleet import placement_for

    groups = [placement_for(_teacher(tp=2)) for _ in range(3)]
    ready, pending = ray.wait([g.ready() for g in groups], num_returns=3, timeout=10)
    assert len(ready) == 2 and len(pending) == 1
    for g in groups:
        ray.util.remove_placement_group(g)


def test_pipeline_parallel_may_spread_over_nodes(emulated_gpus):
    from datagen.teachers.fleet import placement_for

    g = placement_for(_teacher(tp=2, pp=2))
    assert len(g.bundle_specs) == 4
    assert ray.util.placement_group_table(g)["strategy"] == "PACK"
    ray.util.remove_placement_group(g)


def test_num_gpus_must_match_the_engine_parallelism():
    with pytest.raises(ValueError, match="num_gpus: an engine with tensor_parallel_size x pipeline_parallel_size = 4"):
        VLLMTeacher.model_validate({"name": "x", "backend": "vllm", "model": "m", "num_gpus": 1,
                                    "engine": {"tensor_parallel_size": 4}})


def test_gpu_example_job_validates(tmp_path):
    from datagen.config import load_job

    from .conftest import REPO

    job = load_job(REPO / "examples" / "vllm_tp_gpu.yaml")
    t = job.teachers[0]
    assert t.engine.tensor_parallel_size * t.engine.pipeline_parallel_size == t.num_gpus > 1
    with pytest.raises(ConfigError):
        load_job(tmp_path / "missing.yaml")


@ray.remote
class Priority:
    def nice(self):
        import os

        return os.getpriority(os.PRIO_PROCESS, 0)


def test_teacher_actors_keep_the_normal_cpu_priority(emulated_gpus):
    """Ray lowers its worker processes to nice 15; a teacher actor (and the engine
    processes it starts) must not be below the driver and Ray's daemons (TeacherFleet)."""
    from types import SimpleNamespace

    from datagen.config import OpenAITeacher
    from datagen.teachers.fleet import TeacherFleet

    assert ray.get(Priority.remote().nice.remote(), timeout=60) == 15  # Ray's default for workers
    api = OpenAITeacher.model_validate({"name": "api", "backend": "openai", "model": "m", "base_url": "http://x"})
    for t in (_teacher(tp=1), _teacher(tp=2), api):
        made = SimpleNamespace(groups=[])
        opts = TeacherFleet._options(made, t)
        assert ray.get(Priority.options(runtime_env=opts["runtime_env"]).remote().nice.remote(), timeout=60) == 0
        for group in made.groups:
            ray.util.remove_placement_group(group)
