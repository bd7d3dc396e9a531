from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from datagen.testing.fake_openai import FakeOpenAIServer

REPO = Path(__file__).resolve().parent.parent


def extract_answer(messages):
    """A fake teacher that does the support-extract task right, except for messages
    mentioning a "office chair", where it answers prose (so the format filter has work)."""
    import re

    text = messages[-1]["content"]
    if "office chair" in text:
        return "I am sorry to hear that! Please contact the store."
    order = re.search(r"\d{5}", text)
    return json.dumps({"order_id": order.group(0) if order else "", "product": "thing"})


@pytest.fixture
def fake_server():
    with FakeOpenAIServer(answer=extract_answer) as server:
        yield server


def write_job(tmp_path: Path, *, base_url: str, name: str = "t", count: int | None = 20, n: int = 1,
              shard_rows: int = 5000, commit_every_s: float = 60.0, batch_size: int = 4,
              extra_teacher: dict | None = None, **top) -> Path:
    """A job file using the shipped support-extract template and an OpenAI-compatible teacher."""
    teacher = {
        "name": "fake", "backend": "openai", "model": "fake", "base_url": base_url,
        "license": "Apache-2.0", "batch_size": batch_size, "max_concurrency": 4,
        "timeout_s": 5, "max_attempts": 3, "request_token_ids": True,
        "sampling": {"temperature": 0.0, "max_tokens": 64, "n": n, "logprobs": 5},
    }
    teacher.update(extra_teacher or {})
    job = {
        "name": name, "seed": 1,
        "prompts": {"template": str(REPO / "prompts" / "support_extract.yaml"), "count": count},
        "teachers": [teacher],
        "output": {"path": str(tmp_path / "out"), "shard_rows": shard_rows, "commit_every_s": commit_every_s},
        "runtime": {"num_cpus": 2},
    }
    job.update(top)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def datagen(*args: str, timeout: float = 600, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "datagen", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=kw.get("cwd", REPO))


def dedent(s: str) -> str:
    return textwrap.dedent(s).lstrip()
