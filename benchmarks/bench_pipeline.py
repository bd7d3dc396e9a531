"""The whole pipeline at scale: diversify -> fake teacher -> filters -> dedupe -> shards.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_pipeline.py                    # 100k and 500k rows
    PYTHONPATH=. .venv/bin/python benchmarks/bench_pipeline.py --rows 20000 50000 --keep /tmp/bp

For each size, one real ``datagen run`` (local Ray, its own process) of a job that has
everything a production job has:

* **diversify**: seeds with a ``topic`` column drawn by a quota axis, a ``persona`` axis
  dealt to the template, exact and near-duplicate prompt screening (``prompts.dedupe``);
* **teacher**: the fake OpenAI server (``datagen.testing.fake_openai``) in its own process,
  answering instantly (or after ``--latency``) with JSON plus a 40-word note, top-5
  logprobs and token ids (KD rows); one answer in ten is a near-duplicate of nine others;
  a few are prose or carry a bad ``order_id``;
* **filters**: the defaults (nonempty, not_truncated, format) plus a JSON Schema check, on
  a filter actor;
* **dedupe**: streaming MinHash on 2 index actors, the view written at the end;
* **shards**: Parquet + manifest, committed every ``shard_rows`` rows.

Printed per size: wall time of the command (Ray start and prompt planning included), rows/s,
the driver's peak RSS (``os.wait4`` on the ``datagen run`` process: its own figure, not Ray's),
the peak total PSS of its descendants (Ray's GCS, raylet and workers, sampled every 5 s),
and the run's own per-stage figures from ``OUT/metrics.jsonl``. At the end: the time ratio
between the largest and the smallest size. Targets (issue 8, 2 cores) are printed beside the
figures: 500k rows in <= 15 min, driver RSS <= 1.5 GB, time(500k) / time(100k) <= 5.5.
Figures only, no assertions; progress lines go to stderr every ``--every`` seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_openai import start_server  # noqa: E402
from benchmarks.bench_spine import _figures, _run_measured  # noqa: E402

TARGET_SECONDS_500K = 15 * 60
TARGET_DRIVER_MB = 1536
TARGET_RATIO = 5.5

TOPICS = {"home": 0.3, "kitchen": 0.3, "outdoor": 0.2, "tech": 0.2}
PRODUCTS = {"home": ["desk lamp", "throw pillow", "bed sheets"], "kitchen": ["coffee grinder", "air fryer", "kettle"],
            "outdoor": ["camping tent", "hiking boots", "backpack"], "tech": ["wireless mouse", "smart watch", "headset"]}
PERSONAS = ["a busy parent", "a retired teacher", "a small-business owner", "a student"]
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "pu", "ro", "sa", "ti", "vu", "ze")
         for b in ("bar", "cen", "dol", "fis", "gam", "hut", "jor", "kel", "lin", "mop",
                   "nav", "pex", "quo", "rid", "sul", "tav", "ulm", "vex", "wob", "yar")]  # 200 words
SCHEMA = {"type": "object", "required": ["order_id", "product", "note"],
          "properties": {"order_id": {"type": "string", "pattern": "^[0-9]+$"}, "product": {"type": "string"},
                         "note": {"type": "string"}}}


def answer(messages: list[dict[str, str]]) -> str:
    """The fake teacher (run inside the server process): deterministic per prompt.

    Orders divisible by 10 get a note shared by the ten orders of their hundred (and the
    persona), differing in the last word only: clusters of 10 near-duplicates (Jaccard of
    word 3-grams 37/39). Every 23rd order is answered in prose (format filter), every 29th
    with a non-numeric order_id (schema filter)."""
    text = messages[-1]["content"]
    order = int(re.search(r"\d{6,}", text).group(0))
    product = re.search(r"\(([^)]*)\)", text).group(1)
    if order % 23 == 0:
        return "I am sorry to hear that! Please contact the store about your order."
    key = f"{order // 100}/{messages[0]['content']}" if order % 10 == 0 else \
        hashlib.blake2b(repr(messages).encode(), digest_size=8).hexdigest()
    rng = random.Random(key)
    note = [rng.choice(WORDS) for _ in range(40)]
    note[-1] = f"ref{order % 100}"
    order_id = "unknown" if order % 29 == 0 else str(order)
    return json.dumps({"order_id": order_id, "product": product, "note": " ".join(note)})


def write_job(d: Path, rows: int, base_url: str) -> Path:
    import yaml

    rng = random.Random(rows)
    topics = random.Random(0).choices(list(TOPICS), weights=list(TOPICS.values()), k=rows // 2 + 64)
    with open(d / "seeds.jsonl", "w") as f:
        for i, topic in enumerate(topics):  # seeds x personas = 2x the prompts asked for
            words = " ".join(rng.choice(WORDS) for _ in range(14))
            f.write(json.dumps({"id": f"s{i}", "topic": topic,
                                "message": f"Order {100000 + i} ({rng.choice(PRODUCTS[topic])}): {words}"}) + "\n")
    (d / "t.yaml").write_text(yaml.safe_dump({
        "id": "bench-pipeline", "version": "1", "license": "Apache-2.0",
        "system": "Extract the order number and product as JSON, with a short note. "
                  "The reply will be read by {{ persona }}.",
        "user": "{{ message }}",
        "seeds": {"path": "seeds.jsonl", "license": "Apache-2.0", "id_field": "id"},
        "answer": {"format": "json", "required": ["order_id", "product"]}}))
    (d / "job.yaml").write_text(yaml.safe_dump({
        "name": "bench-pipeline", "seed": 7,
        "prompts": {"template": "t.yaml", "count": rows,
                    "axes": {"topic": {"column": "topic", "values": TOPICS}, "persona": {"values": PERSONAS}},
                    "dedupe": {"threshold": 0.8}},
        "teachers": [{"name": "fake", "backend": "openai", "model": "fake", "base_url": base_url,
                      "batch_size": 64, "max_concurrency": 32, "replicas": 2, "timeout_s": 60,
                      "license": "Apache-2.0", "request_token_ids": True,
                      "sampling": {"max_tokens": 128, "logprobs": 5}}],
        "filters": ["nonempty", "not_truncated", "format", {"name": "schema", "json_schema": SCHEMA}],
        "dedupe": {"streaming": True, "actors": 2},
        "runtime": {"num_cpus": 2},
        "output": {"path": "out"}}))
    return d / "job.yaml"


class Sampler(threading.Thread):
    """Every ``every`` s while the run lasts: peak PSS of the driver's descendants (Ray),
    CPU seconds by process kind, and, every ``report`` s, a progress line from the run's
    metrics file."""

    def __init__(self, out: Path, every: float = 5.0, report: float = 30.0):
        super().__init__(daemon=True)
        self.out, self.every, self.report = out, every, report
        self.pid: int | None = None
        self.peak_ray_mb = 0.0
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds when last seen)
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        last = time.monotonic()
        while not self.stop.wait(self.every):
            if self.pid is None:
                continue
            try:
                driver = psutil.Process(self.pid)
                procs = [driver, *driver.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0
            for k in procs:
                try:
                    with k.oneshot():
                        t = k.cpu_times()
                        self.cpu[k.pid] = (_kind(k, self.pid), t.user + t.system)
                        if k.pid != self.pid:
                            mem = k.memory_full_info()
                            total += getattr(mem, "pss", mem.rss)
                except psutil.Error:
                    pass
            self.peak_ray_mb = max(self.peak_ray_mb, total / 2**20)
            if time.monotonic() - last >= self.report:
                last = time.monotonic()
                line = last_metrics(self.out)
                if line:
                    print(f"  [{line['elapsed_s']:7.1f} s] " + progress_text(line), file=sys.stderr, flush=True)


def _kind(proc, driver_pid: int) -> str:
    """What a process is: the driver, a Ray actor by class (its title), or Ray's own."""
    if proc.pid == driver_pid:
        return "driver (datagen run)"
    cmd = proc.cmdline()
    title = cmd[0] if cmd else proc.name()
    if title.startswith("ray::"):
        return title.split(".")[0].split()[0]
    return proc.name()


def cpu_by_kind(cpu: dict[int, tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for kind, secs in cpu.values():
        out[kind] = out.get(kind, 0.0) + secs
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def last_metrics(out: Path) -> dict | None:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:  # a line being appended
            continue
    return None


def progress_text(m: dict) -> str:
    s = m["stages"]
    return (f"pulled {s['prompts']['pulled']}  teacher in flight {s['teacher']['inflight_batches']} "
            f"({s['teacher']['rows_per_s']:.0f} rows/s)  filters {s['filters']['inflight_batches']}+"
            f"{s['filters']['queued_batches']} queued  dedupe {s['dedupe'].get('indexed', '-')}  "
            f"committed {s['store']['committed']} ({s['store']['rows_per_s']:.0f} rows/s), "
            f"{s['store']['pending']} pending")


def bench_size(rows: int, base_url: str, keep: Path | None, every: float) -> dict:
    d = Path(tempfile.mkdtemp(prefix=f"bench-pipeline-{rows}-", dir=keep))
    try:
        job = write_job(d, rows, base_url)
        sampler = Sampler(d / "out", report=every)
        sampler.start()
        t = time.perf_counter()
        out, err, driver_mb = _run_measured([sys.executable, "-m", "datagen", "run", str(job)],
                                            on_start=lambda pid: setattr(sampler, "pid", pid))
        wall = time.perf_counter() - t
        sampler.stop.set()
        sampler.join()
        figures = _figures(out)
        if not figures:
            print(err[-3000:], file=sys.stderr)
        final = last_metrics(d / "out")
        return {"rows": rows, "wall": wall, "driver_mb": driver_mb, "ray_mb": sampler.peak_ray_mb,
                "cpu": cpu_by_kind(sampler.cpu),
                "figures": figures, "metrics": final, "dir": d}
    finally:
        if keep is None:
            shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 500_000], help="sizes to run (default 100k 500k)")
    p.add_argument("--latency", type=float, default=0.0, help="fake teacher latency per request, seconds")
    p.add_argument("--keep", type=Path, help="keep each run's folder under this directory")
    p.add_argument("--every", type=float, default=30.0, help="seconds between progress lines")
    args = p.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    print(f"python {sys.version.split()[0]}, cpus {len(os.sched_getaffinity(0))}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    server, url = start_server(args.latency, "--answer", "benchmarks.bench_pipeline:answer")
    results = []
    try:
        for rows in sorted(args.rows):
            print(f"## {rows} rows (diversify -> fake teacher, latency {args.latency:g} s -> filters -> "
                  "streaming dedupe -> shards)", flush=True)
            before = _cpu_seconds(server.pid)
            r = bench_size(rows, url, args.keep, args.every)
            r["cpu"]["fake server (not part of datagen)"] = _cpu_seconds(server.pid) - before
            results.append(r)
            print(r["figures"])
            rate = rows / r["wall"]
            print(f"command wall time  {r['wall']:8.1f} s  ({rate:.0f} rows/s over the whole command)")
            if rows == 500_000:
                print(f"  target 500k in <= {TARGET_SECONDS_500K} s: {'met' if r['wall'] <= TARGET_SECONDS_500K else 'MISSED'}")
            print(f"driver peak RSS    {r['driver_mb']:8.0f} MB  (target <= {TARGET_DRIVER_MB} MB: "
                  f"{'met' if r['driver_mb'] <= TARGET_DRIVER_MB else 'MISSED'})")
            print(f"Ray peak PSS       {r['ray_mb']:8.0f} MB  (GCS, raylet, workers; sampled every 5 s)")
            print("CPU seconds        " + ", ".join(f"{k} {v:.0f}" for k, v in r["cpu"].items() if v >= 0.5)
                  + "  (last sample before each process ended)")
            if r["metrics"]:
                print("stages at the end: " + progress_text(r["metrics"]))
            if args.keep:
                print(f"kept: {r['dir']}")
            print(f"load average now   {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    finally:
        server.terminate()
        server.wait(10)
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        ratio = hi["wall"] / lo["wall"]
        verdict = ("met" if ratio <= TARGET_RATIO else "MISSED") if (lo["rows"], hi["rows"]) == (100_000, 500_000) \
            else "judged at 100k -> 500k only"
        print(f"time({hi['rows']}) / time({lo['rows']}) = {ratio:.2f}  (rows x{hi['rows'] / lo['rows']:g}; "
              f"target <= {TARGET_RATIO} for 500k/100k: {verdict})")


if __name__ == "__main__":
    main()
