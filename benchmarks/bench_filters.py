"""Filter speed, printed as figures (no assertions).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_filters.py
    PYTHONPATH=. .venv/bin/python benchmarks/bench_filters.py --programs 400 --concurrency 2 4 8

1. Sandboxed code verifications per second: the shipped problems' solutions and stubs
   (``filters/code/problems.jsonl``, short programs with 4-6 asserts each), each one a
   fresh sandboxed interpreter, run concurrently by the code filter's thread pool.
   Target: >= 20/s on 2 cores.
2. Heuristic filter rows per second: the chain nonempty, not_truncated, length,
   repetition, refusal, language, template_leak over synthetic ~80-word answers
   (a tenth are refusals, repeats or leaks): in one process (wall and per CPU-second),
   then in one process per core; and the job's default chain (nonempty, not_truncated,
   format) for comparison. Target: >= 50k/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datagen.filters import DEFAULT_FILTERS, FilterChain  # noqa: E402
from datagen.prompts import AnswerFormat  # noqa: E402

HEURISTICS = ["nonempty", "not_truncated", {"name": "length", "min_chars": 20, "max_chars": 4000},
              "repetition", "refusal", "language", "template_leak"]


def bench_code(programs: int, concurrency: int) -> tuple[float, int]:
    probs = [json.loads(x) for x in (ROOT / "filters/code/problems.jsonl").read_text().splitlines()]
    rows, seeds = [], []
    for i in range(programs):
        p = probs[i % len(probs)]
        code = p["solution"] if i % 2 == 0 else p["stub"]
        rows.append({"response": f"```python\n{code}```"})
        seeds.append(p)
    chain = FilterChain([{"name": "code", "concurrency": concurrency}], AnswerFormat())
    chain.run(rows[:4], seeds[:4])  # warm the page cache for the interpreter
    t0 = time.perf_counter()
    verdicts = chain.run(rows, seeds)
    dt = time.perf_counter() - t0
    return programs / dt, sum(v[0].keep for v in verdicts)


WORDS = ("the of and to in is was for on with as by at from that this it are be an or which data model "
         "train value result answer first then each step number order product count total because").split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(80)).capitalize() + "."
        kind = i % 30
        if kind == 0:
            text = "I'm sorry, but I can't help with that request."
        elif kind == 1:
            text = "the same words again " * 20
        elif kind == 2:
            text += "<|im_end|>"
        rows.append({"response": text, "finish_reason": "stop", "sampling": {"max_tokens": 256},
                     "messages": [{"role": "user", "content": "Explain the result."}]})
    return rows


def _judge(n: int, specs: list | None = None) -> tuple[int, float, float, float, int]:
    """Judge n synthetic rows: (rows, start, end, CPU seconds, rows dropped)."""
    rows = make_rows(n)
    seeds = [None] * n
    chain = FilterChain(specs or HEURISTICS, AnswerFormat())
    t0, c0 = time.perf_counter(), time.process_time()
    verdicts = []
    for start in range(0, n, 1000):  # batches, as the filter actors get them
        verdicts += chain.run(rows[start:start + 1000], seeds[start:start + 1000])
    return n, t0, time.perf_counter(), time.process_time() - c0, sum(1 for v in verdicts if not v[-1].keep)


def bench_heuristics(n: int, specs: list | None = None) -> tuple[float, float, int]:
    """(rows per wall second, rows per CPU second of this process, rows dropped)."""
    _, t0, t1, cpu, dropped = _judge(n, specs)
    return n / (t1 - t0), n / cpu, dropped


def bench_heuristics_parallel(n: int, procs: int) -> float:
    """Rows per wall second with ``procs`` processes judging n/procs rows each (what
    ``runtime.filter_actors: procs`` gives): from the first start to the last end, on
    the system-wide monotonic clock; making the rows is not timed."""
    from multiprocessing import get_context

    with get_context("fork").Pool(procs) as pool:
        parts = pool.map(_judge, [n // procs] * procs)
    return sum(p[0] for p in parts) / (max(p[2] for p in parts) - min(p[1] for p in parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", type=int, default=200)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    from datagen.filters.sandbox import default_python, isolation

    cores = len(os.sched_getaffinity(0))
    print(f"cores available: {cores}; sandbox interpreter: {default_python()}; isolation: {isolation()}")
    for c in args.concurrency:
        rate, passed = bench_code(args.programs, c)
        print(f"sandboxed code verifications/s: {rate:.1f}  (programs={args.programs}, concurrency={c}, "
              f"passed={passed})")
    rate, cpu_rate, dropped = bench_heuristics(args.rows)
    # Per CPU-second too: on a shared machine the wall figure says more about the neighbours.
    print(f"heuristic filter rows/s (1 process): {rate:,.0f} wall, {cpu_rate:,.0f} per CPU-second  "
          f"(rows={args.rows}, filters={len(HEURISTICS)}, dropped={dropped}, load avg {os.getloadavg()[0]:.1f})")
    rate, cpu_rate, dropped = bench_heuristics(args.rows, list(DEFAULT_FILTERS))
    print(f"default filters {list(DEFAULT_FILTERS)} rows/s (1 process): {rate:,.0f} wall, {cpu_rate:,.0f} per "
          f"CPU-second  (dropped={dropped})")
    rate = bench_heuristics_parallel(args.rows, cores)
    print(f"heuristic filter rows/s ({cores} processes): {rate:,.0f} wall  (load avg {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
