"""``datagen rescore``: what it refuses before any engine starts (fast). The engine path
itself (same-model re-scoring reproduces generation-time logprobs) is in test_vllm_run.py
and test_vllm_engine.py."""

from __future__ import annotations

import pytest
import yaml

from datagen.config import load_job
from datagen.errors import ConfigError
from datagen.rescore import _terms, load_teacher
from datagen.storage.shards import ShardStore

from .conftest import datagen, write_job

VLLM = {"name": "smol", "backend": "vllm", "model": "embedded:smollm2-135m-instruct"}


def test_rescore_needs_a_vllm_teacher(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"name": "x", "backend": "openai", "model": "m",
                                                     "base_url": "http://127.0.0.1:1/v1"}))
    (tmp_path / "out").mkdir()
    res = datagen("rescore", str(tmp_path / "out"), "--teacher", str(tmp_path / "t.yaml"))
    assert res.returncode == 1 and "needs a self-hosted vLLM teacher (backend: vllm)" in res.stderr


def test_teacher_file_errors_name_the_field(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(VLLM | {"engine": {"batching": "sometimes"}}))
    with pytest.raises(ConfigError, match=r"t\.yaml: engine\.batching: .*\(got 'sometimes'\)"):
        load_teacher(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be one mapping"):
        load_teacher(tmp_path / "t.yaml")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(VLLM))
    assert load_teacher(tmp_path / "t.yaml").sampling.logprobs == 20  # re-scoring without k means top-20


def _run(tmp_path, fake_server, **teacher):
    job = write_job(tmp_path, base_url=fake_server.base_url, count=4, extra_teacher=teacher)
    assert datagen("run", str(job)).returncode == 0
    return ShardStore.open(load_job(job).output.path)


def test_rescore_checks_the_terms_it_would_add(tmp_path, fake_server):
    store = _run(tmp_path, fake_server, license="Apache-2.0")
    assert _terms(store, load_teacher(_write(tmp_path, VLLM))) == "Apache-2.0"  # embedded: known terms
    with pytest.raises(ConfigError, match="license: unknown terms for some/model"):
        _terms(store, load_teacher(_write(tmp_path, VLLM | {"model": "some/model"})))


def test_rescore_refuses_terms_that_conflict(tmp_path, fake_server):
    store = _run(tmp_path, fake_server, license="LicenseRef-Llama-3.1")
    with pytest.raises(ConfigError, match="would mix terms that conflict"):
        _terms(store, load_teacher(_write(tmp_path, VLLM | {"model": "google/gemma-2-9b-it",
                                                            "license": "LicenseRef-Gemma"})))


def _write(tmp_path, teacher):
    path = tmp_path / "teacher.yaml"
    path.write_text(yaml.safe_dump(teacher))
    return path
