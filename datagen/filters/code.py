"""Code answers: take the program out of the answer and run it against the seed row's
unit tests in the sandbox (``sandbox.py``). PASS keeps the row; every way of failing --
a failed assert, an exception, a timeout, a resource limit, exiting early -- drops it
with the sandbox's reason (``code.test_failed``, ``code.timeout``, ...).

Tests that would run no check are refused before any generation (``check_seeds``, run by
``datagen validate``): tests with no ``assert``, and benchmark-style tests that only define
``check(candidate)`` when the seed names no entry point (``entry_point_field``; with one,
the sandbox calls ``check(<entry point>)``). At run time, tests that executed no assert
drop the row as ``code.no_tests_ran``.

A sandbox that cannot run at all raises ``SandboxError``: that stops the run instead of
dropping rows, since it says nothing about the answer.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from datagen.filters.base import Context, Filter, FilterError, FilterSpec, Row, Seed, Verdict, require_field

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


_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _outside_defs(node: ast.AST):
    """``node`` and what it contains, not looking into function or class bodies."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, _DEFS):
            yield from _outside_defs(child)


def why_no_check(tests: str, *, entry_point: bool) -> str | None:
    """Why these tests would run no check at all (None when they look like they do): a
    syntax error, no ``assert`` anywhere, or asserts only inside functions that nothing at
    top level calls (``check(candidate)`` counts as called when there is an entry point)."""
    try:
        tree = ast.parse(tests)
    except SyntaxError as exc:
        return f"its tests have a syntax error (line {exc.lineno}: {exc.msg})"
    if not any(isinstance(n, ast.Assert) for n in ast.walk(tree)):
        return "its tests contain no assert statement, so they would pass any program (asserts nothing)"
    top = [n for stmt in tree.body if not isinstance(stmt, _DEFS) for n in _outside_defs(stmt)]
    if any(isinstance(n, ast.Assert) for n in top):
        return None
    defined = {n.name for n in tree.body if isinstance(n, _DEFS[:3])}
    called = {n.func.id for n in top if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    if defined & called or (entry_point and "check" in defined):
        return None
    names = ", ".join(f"{d}()" for d in sorted(defined))
    return f"its tests define {names} but never call them, so nothing would be checked"


class CodeSpec(FilterSpec):
    name: Literal["code"] = "code"
    tests_field: str = Field("tests", min_length=1, description="the seed field holding the unit tests")
    timeout_s: float = Field(10.0, gt=0.0, le=600.0, description="wall clock per program")
    cpu_s: int = Field(10, ge=1, le=600)
    memory_mb: int = Field(1024, ge=64, le=65536, description="address space per process")
    processes: int = Field(64, ge=1, le=4096)
    file_mb: int = Field(16, ge=1, le=4096, description="largest file (stdout included)")
    tmp_mb: int = Field(64, ge=1, le=4096, description="all files of one run (its private /tmp, /dev/shm: RAM)")
    entry_point_field: str = Field(
        "entry_point", min_length=1,
        description="the seed field naming the function under test; tests that define check(candidate) get "
                    "check(<that function>) called (HumanEval-style)")
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
                             processes=spec.processes, file_bytes=spec.file_mb << 20,
                             tmp_bytes=spec.tmp_mb << 20)

    def check_seeds(self, seeds, *, id_field: str) -> None:
        require_field(seeds, self.s.tests_field, id_field=id_field, filter_name="code")
        for s in seeds:
            why = why_no_check(tests_source(s[self.s.tests_field]), entry_point=bool(s.get(self.s.entry_point_field)))
            if why:
                raise FilterError(
                    f"filters: code: seed {s.get(id_field)!r}: {why} (give the seed an "
                    f"{self.s.entry_point_field!r} field naming the function to test, or fix its "
                    f"{self.s.tests_field!r})")

    def check(self, row: Row, seed: Seed) -> Verdict:
        from datagen.filters.sandbox import run_code

        code = extract_code(row.get("response") or "")
        if code is None:
            return self.drop("code.no_code")
        tests = tests_source((seed or {}).get(self.s.tests_field, ""))
        entry_point = (seed or {}).get(self.s.entry_point_field) or None
        res = run_code(code, tests, limits=self.limits, entry_point=entry_point and str(entry_point))
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
