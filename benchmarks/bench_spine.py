"""Throughput and memory of the spine, printed as figures (no assertions).

    .venv/bin/python benchmarks/bench_spine.py                 # store + pipeline
    .venv/bin/python benchmarks/bench_spine.py --vllm          # + the embedded vLLM teacher

1. store:    rows/s and MB/s of the shard writer for KD-sized rows (128 tokens with top-20
             logprobs), and the writer process's peak RSS at 2 sizes: flat means the
             writer streams instead of buffering.
2. pipeline: rows/s through the whole driver (Ray actors, openai client, filters,
             commits) against the fake server answering instantly: the ceiling the
             spine itself puts on a fast teacher. Run at N and 10N rows, with the
             driver's own peak RSS: flat memory means backpressure works.
3. vllm:     rows/s and completion tokens/s of the quickstart job on the embedded
             SmolLM2-135M teacher (CPU), engine start-up reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def kd_row(i: int, rng: random.Random) -> dict:
    from datagen import records

    n, k = 128, 20
    r = records.empty_row()
    r.update(
        row_id=f"{i:032x}", prompt_id=f"{i:032x}", sample_index=0,
        messages=[{"role": "user", "content": "word " * 60}], response="tok " * n, finish_reason="stop",
        token_ids=[rng.randrange(49152) for _ in range(n)],
        token_logprobs_q=records.quantize_logprobs([-rng.random() for _ in range(n)]),
        top_ids=[[rng.randrange(49152) for _ in range(k)] for _ in range(n)],
        top_logprobs_q=records.encode_top(
            [[0] * k for _ in range(n)],
            [sorted((-5 * rng.random() for _ in range(k)), reverse=True) for _ in range(n)])[1],
        license={"teacher": "Apache-2.0", "seed": "Apache-2.0", "template": "Apache-2.0"},
    )
    return r


STORE_CHILD = """
import sys, time, random, resource, json
sys.path.insert(0, {repo!r})
from pathlib import Path
from benchmarks.bench_spine import kd_row
from datagen.config import Output
from datagen.storage import create_store
n = int(sys.argv[1]); out = Path(sys.argv[2])
rng = random.Random(0)
pool = [kd_row(i, rng) for i in range(256)]   # rows are made once: time the writer, not the maker
store = create_store(out, Output(path=out, shard_rows=5000), job_meta={{"name": "b", "run_fingerprint": "b", "job": {{}}}})
t = time.perf_counter()
for i in range(n):
    r = dict(pool[i % 256]); r["row_id"] = f"{{i:032x}}"
    store.add("accepted", r)
store.commit_all()
secs = time.perf_counter() - t
size = sum(s["bytes"] for s in store.manifest.shards)
print(json.dumps({{"rows": n, "secs": secs, "bytes": size, "shards": len(store.manifest.shards),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def bench_store() -> None:
    print("## shard store (KD rows: 128 tokens x top-20 logprobs)")
    for n in (5_000, 20_000):
        with tempfile.TemporaryDirectory() as d:
            res = subprocess.run([sys.executable, "-c", STORE_CHILD.format(repo=str(REPO)), str(n), f"{d}/o"],
                                 capture_output=True, text=True, check=True)
            r = json.loads(res.stdout)
            print(f"rows={r['rows']:>6}  {r['rows'] / r['secs']:8.0f} rows/s  "
                  f"{r['bytes'] / r['secs'] / 2**20:6.1f} MB/s  {r['bytes'] / r['rows'] / 1024:5.1f} KiB/row  "
                  f"shards={r['shards']}  peak RSS {r['peak_rss_mb']:.0f} MB")


def bench_pipeline(rows: int) -> None:
    import yaml

    from datagen.testing.fake_openai import FakeOpenAIServer

    print(f"## pipeline through Ray + openai client, fake teacher answering instantly ({rows} rows)")
    seeds = [{"id": f"s{i}", "message": f"order {10000 + i} for a lamp"} for i in range(rows)]
    with tempfile.TemporaryDirectory() as d, FakeOpenAIServer(
        answer=lambda m: json.dumps({"order_id": re.search(r"\d+", m[-1]["content"]).group(0), "product": "lamp"})
    ) as server:
        d = Path(d)
        (d / "seeds.jsonl").write_text("".join(json.dumps(s) + "\n" for s in seeds))
        (d / "t.yaml").write_text(yaml.safe_dump({
            "id": "bench", "version": "1", "license": "Apache-2.0", "user": "{{ message }}",
            "seeds": {"path": "seeds.jsonl", "license": "Apache-2.0"},
            "answer": {"format": "json", "required": ["order_id"]}}))
        (d / "job.yaml").write_text(yaml.safe_dump({
            "name": "bench", "prompts": {"template": "t.yaml"},
            "teachers": [{"name": "fake", "backend": "openai", "model": "fake", "base_url": server.base_url,
                          "batch_size": 64, "max_concurrency": 32, "replicas": 2,
                          "license": "Apache-2.0", "request_token_ids": True,
                          "sampling": {"max_tokens": 64, "logprobs": 5}}],
            "output": {"path": "out"}}))
        t = time.perf_counter()
        out, err, driver_mb = _run_measured([sys.executable, "-m", "datagen", "run", str(d / "job.yaml")])
        wall = time.perf_counter() - t
        print(_figures(out) or err[-2000:])
        print(f"command wall time (Ray start included): {wall:.1f} s; driver peak RSS {driver_mb:.0f} MB")


def _run_measured(cmd: list[str], on_start=None) -> tuple[str, str, float]:
    """Run ``cmd``; return its stdout, stderr and its own peak RSS in MB (wait4 gives the
    child's figure alone: Ray's processes, its children, are not counted). ``on_start``
    gets the child's pid (for a sampler thread)."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fo, stderr=fe, text=True)
        if on_start is not None:
            on_start(proc.pid)
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        fo.seek(0)
        fe.seek(0)
        return fo.read(), fe.read(), usage.ru_maxrss / 1024


def bench_vllm() -> None:
    print("## embedded vLLM teacher (quickstart job, CPU)")
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "datagen", "run", "examples/quickstart.yaml", "--output",
                              f"{d}/out"], cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t
        print(_figures(res.stdout) or res.stderr[-2000:])
        print(f"command wall time: {wall:.1f} s")


def _figures(summary: str) -> str:
    keep = ("rows generated", "accepted", "rejected", "failed", "completion tokens", "wall time",
            "start-up", "generating", "rows/s", "tokens/s")
    lines = []
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) >= 2 and cells[0].startswith(keep):
            lines.append(f"{cells[0]:<36} {cells[1]:>10}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm", action="store_true", help="also run the embedded vLLM teacher (minutes)")
    p.add_argument("--rows", type=int, default=2000, help="rows for the pipeline benchmark")
    args = p.parse_args()
    print(f"python {sys.version.split()[0]}, cpus {len(__import__('os').sched_getaffinity(0))}")
    bench_store()
    for rows in (args.rows, 10 * args.rows):  # flat driver memory: 10x the rows, same RSS
        bench_pipeline(rows)
    if args.vllm:
        bench_vllm()
    print(f"benchmark driver peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
