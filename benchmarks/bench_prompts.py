"""Prompt rendering throughput on one core, and the near-duplicate rate of a 50k-prompt
stream built from the starter library (``prompts/``) with diversity axes.

    python benchmarks/bench_prompts.py [--total 50000] [--render 50000]

Prints:
* templated renders/s (``Template.render``: system + user turns, Jinja2, strict), best and
  median of ``--repeat`` runs (the machine may be shared);
* planned prompts/s (``make_plan``: quota dealing, seed draw, render, exact-duplicate check);
* request stream rows/s (render again + prompt id + row id + per-row seed, one teacher, n=1);
* for the 50k stream: prompts per template, the seeds screened out as near-duplicates,
  and the share of prompts that batch MinHash (word 3-grams, J >= 0.8, exact verify)
  puts in a cluster with another prompt -- the near-dup rate -- over the text that varies
  (system + last user turn), overall and per template. Axis values vary the wording, not
  the content, so this rate is bounded below by 1 - seeds/prompts: the 224 library seeds
  cannot make 50k different tasks (``datagen expand`` grows the seeds).

The process is pinned to one CPU so the figures are per core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from datagen.dedupe import minhash  # noqa: E402
from datagen.config import load_job  # noqa: E402
from datagen.prompts import PromptStream  # noqa: E402
from datagen.prompts.plan import make_plan  # noqa: E402

PERSONAS = ["a ten-year-old", "a busy parent", "an engineering student", "a retired teacher", "a nurse",
            "a small-business owner", "someone learning English", "a data analyst", "a farmer", "a lawyer",
            "a museum guide", "a bus driver", "a chef", "a software tester", "a librarian", "a pilot",
            "a journalist", "a physiotherapist", "a high-school coach", "an architect", "a pharmacist",
            "a translator", "a park ranger", "a night-shift worker", "a beekeeper", "a nurse trainee",
            "a radio host", "a carpenter", "a marine biologist", "a city planner", "a shop assistant",
            "a first-year medical student"]
AXES = {
    "persona": {"values": PERSONAS},
    "language": {"values": ["English", "French", "Spanish", "German", "Portuguese", "Italian", "Dutch", "Polish",
                            "Swedish", "Czech", "Turkish", "Indonesian"]},
    "length": {"values": ["short", "in one sentence", "in under five sentences", "in detail"]},
    "format": {"values": ["plain prose", "bullet points", "a numbered list", "a headline and one paragraph"]},
    "style": {"values": ["idiomatic", "commented", "type-annotated", "minimal"]},
}
# Prompts per library template: at most about a quarter of what its seeds x axis values
# allow: axes are dealt independently, so one value combination may draw more slots than
# its pool has seeds (the plan then refuses, naming it).
SHARE = {"summarize": 33_600, "math_word": 12_000, "qa_short": 3_000, "code_tests": 900,
         "classify_sentiment": 350, "support_extract": None, "judge_rubric": None}


def job_for(tmp: Path, template: str, count: int | None, *, dedupe: bool) -> Path:
    tpl = REPO / "prompts" / f"{template}.yaml"
    from datagen.prompts import load_template

    variables = load_template(tpl).variables
    axes = {k: v for k, v in AXES.items() if k in variables}
    prompts = {"template": str(tpl), "count": count, "axes": axes}
    if dedupe:
        prompts["dedupe"] = {}
    job = {"name": f"bench-{template.replace('_', '-')}", "seed": 11, "prompts": prompts,
           "teachers": [{"name": "t", "backend": "openai", "model": "m", "license": "MIT",
                         "base_url": "http://127.0.0.1:9/v1"}],
           "output": {"path": str(tmp / "out")}}
    path = tmp / f"{template}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _timed(fn, repeat: int) -> tuple[float, float]:
    """(best, median) seconds of ``repeat`` runs: on a shared machine the best run is the
    one least disturbed by other processes."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[0], times[len(times) // 2]


def bench_render(tmp: Path, n: int, repeat: int) -> None:
    job = load_job(job_for(tmp, "math_word", 12_000, dedupe=False))
    stream = PromptStream(job, run_fingerprint="bench")
    t = stream.template
    values = [{**t.seeds.rows[i], **dict(zip(stream.plan.axes, combo))} for i, combo in stream.plan.slots]
    values = (values * (n // len(values) + 1))[:n]
    best, med = _timed(lambda: [t.render(v) for v in values], repeat)
    print(f"render: {n} prompts (math_word: system + user turn, 3 free axes): best {n / best:,.0f} prompts/s, "
          f"median {n / med:,.0f} (of {repeat} runs)")
    planned = len(stream.plan.slots)
    best, med = _timed(lambda: make_plan(t, job.prompts, job.seed), repeat)
    print(f"plan:   {planned} prompts dealt, drawn, rendered and checked: best {planned / best:,.0f} prompts/s, "
          f"median {planned / med:,.0f}")
    best, med = _timed(lambda: sum(1 for _ in stream), repeat)
    print(f"stream: {planned} requests (render + prompt id + row id + seed): best {planned / best:,.0f} rows/s, "
          f"median {planned / med:,.0f}")


def bench_near_dups(tmp: Path, total: int) -> None:
    scale = total / 50_000
    ids, texts, origin = [], [], []
    start = time.perf_counter()
    screened = 0
    for template, share in SHARE.items():
        count = None if share is None else max(1, int(share * scale))
        stream = PromptStream(load_job(job_for(tmp, template, count, dedupe=True)), run_fingerprint="bench")
        screened += stream.plan.report["near_duplicate_seeds"]
        for k in range(len(stream.plan.slots)):
            messages, _ = stream.prompt(k)
            system = messages[0]["content"] if messages[0]["role"] == "system" else ""
            texts.append(f"{system}\n{messages[-1]['content']}")
            ids.append(f"{len(ids):08d}")
            origin.append(template)
    built = time.perf_counter() - start
    start = time.perf_counter()
    cl = minhash.find_clusters(ids, texts, threshold=0.8)
    secs = time.perf_counter() - start
    removed = len(ids) - len(cl.kept())
    sizes = cl.sizes()
    in_cluster = {i for i, c in enumerate(cl.cluster_of) if sizes[c] > 1}
    print(f"library stream: {len(ids)} prompts from {len(SHARE)} templates built in {built:.1f} s; "
          f"{screened} seeds screened out as near-duplicates of other seeds")
    print(f"near-dup rate (MinHash word 3-grams, J >= 0.8): {removed}/{len(ids)} prompts would be removed = "
          f"{removed / len(ids):.1%}; {len(in_cluster) / len(ids):.1%} are in a cluster of 2+ "
          f"({cl.exact_duplicates} exact; clustering took {secs:.1f} s)")
    for template in SHARE:
        members = [i for i, o in enumerate(origin) if o == template]
        kept = sum(1 for i in members if cl.cluster_of[i] == i)
        print(f"  {template:<20} {len(members):>6} prompts, {kept:>6} cluster representatives "
              f"({1 - kept / len(members):.1%} near-duplicates)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=50_000)
    ap.add_argument("--render", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each rate (best and median printed)")
    ap.add_argument("--skip-near", action="store_true", help="rates only")
    args = ap.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    print(f"one core; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start")
    with tempfile.TemporaryDirectory() as tmp:
        bench_render(Path(tmp), args.render, args.repeat)
        if not args.skip_near:
            bench_near_dups(Path(tmp), args.total)


if __name__ == "__main__":
    main()
