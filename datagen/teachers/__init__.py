"""Teacher backends: their job-file specs (``spec.py``), the backends (``vllm_engine.py``,
``openai_api.py``), the Ray actor that hosts one (``actor.py``) and the fleet of those
actors a run or a re-score drives (``fleet.py``).

``TEACHERS`` is the registry: backend name (the job file's ``backend:``) -> the class
built inside the actor from the teacher's spec. Backends import their heavy
dependencies when constructed, never at module import. A new backend is its spec in
``spec.py`` (and ``spec.SPECS``), its module here, and one line below.
"""

from __future__ import annotations

from datagen.teachers.spec import SPECS, OpenAITeacher, VLLMTeacher


def _vllm(cfg: VLLMTeacher):
    from datagen.teachers.vllm_engine import VLLMEngineTeacher

    return VLLMEngineTeacher(cfg)


def _openai(cfg: OpenAITeacher):
    from datagen.teachers.openai_api import OpenAICompatibleTeacher

    return OpenAICompatibleTeacher(cfg)


TEACHERS = {"vllm": _vllm, "openai": _openai}
assert set(TEACHERS) == set(SPECS), "every backend needs a spec and a builder"


def build(cfg: VLLMTeacher | OpenAITeacher):
    return TEACHERS[cfg.backend](cfg)
