"""Code answers: take the program out of the answer and run it against the seed row's
unit tests in the sandbox (``sandbox.py``). PASS keeps the row; every way of failing --
a failed assert, an exception, a timeout, a resource limit, exiting early -- drops it
with the sandbox's reason (``code.test_failed``, ``code.timeout``, ...).

A sandbox that cannot run at all raises ``SandboxError``: that stops the run instead of
dropping rows, since it says nothing about the answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from datagen.filters.base import Context, Filter, FilterSpec, Row, Seed, Verdict, require_field

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The program in an answer: the longest fenced block (python or untagged), else the
    whole answer when it has no fences at all."""
    blocks = _FENCE.findall(text)
    if blocks:
        return max(blocks, key=len)
    return None if "```" in text or not text.strip() else text


def tests_source(value: Any) -> str:
    """The seed's tests: a string of Python, or a list of assert statements."""
    if isinstance(value, list):
        return "\n".join(str(t) for t in value)
    return str(value)


class CodeSpec(FilterSpec):
    name: Literal["code"] = "code"
    tests_field: str = Field("tests", min_length=1, description="the seed field holding the unit tests")
    timeout_s: float = Field(10.0, gt=0.0, le=600.0, description="wall clock per program")
    cpu_s: int = Field(10, ge=1, le=600)
    memory_mb: int = Field(1024, ge=64, le=65536, description="address space per process")
    processes: int = Field(64, ge=1, le=4096)
    file_mb: int = Field(16, ge=1, le=4096, description="largest file (stdout included)")
    concurrency: int = Field(
        8, ge=1, le=64, description="programs run at once per filter worker (subprocesses: threads only wait)"
    )

    def build(self, answer: Any, context: Context) -> Filter:
        return CodeExec(self)


class CodeExec(Filter):
    name = "code"

    def __init__(self, spec: CodeSpec):
        from datagen.filters.sandbox import Limits

        self.s = spec
        self.limits = Limits(timeout_s=spec.timeout_s, cpu_s=spec.cpu_s, memory_bytes=spec.memory_mb << 20,
                             processes=spec.processes, file_bytes=spec.file_mb << 20)

    def check_seeds(self, seeds, *, id_field: str) -> None:
        require_field(seeds, self.s.tests_field, id_field=id_field, filter_name="code")

    def check(self, row: Row, seed: Seed) -> Verdict:
        from datagen.filters.sandbox import run_code

        code = extract_code(row.get("response") or "")
        if code is None:
            return self.drop("code.no_code")
        tests = tests_source((seed or {}).get(self.s.tests_field, ""))
        res = run_code(code, tests, limits=self.limits)
        details = res.details[:300]
        if res.passed:
            return self.keep(score=1.0, details=f"{res.seconds:.2f} s")
        return self.drop(res.reason, details=details, score=0.0)

    def check_batch(self, rows: Sequence[Row], seeds: Sequence[Seed]) -> list[Verdict]:
        # Each program is its own process: threads only wait on them, so they overlap.
        if len(rows) <= 1 or self.s.concurrency == 1:
            return super().check_batch(rows, seeds)
        with ThreadPoolExecutor(max_workers=self.s.concurrency) as pool:
            return list(pool.map(self.check, rows, seeds))
