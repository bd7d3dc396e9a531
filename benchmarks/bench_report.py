"""`datagen report` on a large output: wall time, peak memory and page size, printed (no assertions).

    .venv/bin/python benchmarks/bench_report.py [--rows 500000]

Builds a synthetic output through the real store (``create_store`` / ``add_table`` /
``commit_all``): small rows (a short prompt and answer, 8 generated tokens with top-5
log-probs, three filter verdicts with scores), 80% accepted, 15% rejected by two reasons,
5% failed, plus a ``metrics.jsonl`` of a 3-hour run (one line every 10 s). Then times
``write_report`` on it. The rows are built once as a 10k-row Arrow table and committed
again under new ids, so building the output takes seconds, not minutes.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402

from datagen import records  # noqa: E402

BLOCK = 10_000
TOKENS, TOPK = 8, 5


def block(stream: str, start: int) -> pa.Table:
    rows = []
    for i in range(BLOCK):
        k = start + i
        drop = {"rejected": "length.too_short" if i % 3 else "format.invalid_json"}.get(stream)
        verdicts = [{"filter": f, "keep": not (drop and drop.startswith(f)), "reason": drop if drop and drop.startswith(f) else "ok",
                     "score": (k % 100) / 100, "details": None} for f in ("nonempty", "format", "length")]
        r = records.empty_row()
        r.update(row_id=f"{stream[0]}{k:031x}", prompt_id=f"p{k // 2}", sample_index=k % 2,
                 messages=[{"role": "user", "content": f"question {k}: how many apples are in basket {k % 97}?"}],
                 response=None if stream == "failed" else f"There are {k % 13} apples in basket {k % 97}.",
                 finish_reason="stop", teacher={"name": "t", "backend": "openai", "model": "m", "revision": None},
                 usage={"prompt_tokens": 20, "completion_tokens": 4 + k % 9, "cost_usd": 1e-5},
                 token_ids=list(range(TOKENS)), token_logprobs_q=[k % 50 + j for j in range(TOKENS)],
                 top_ids=[list(range(TOPK))] * TOKENS, top_logprobs_q=[[k % 40, 3, 5, 8, 13]] * TOKENS,
                 verdicts=[] if stream == "failed" else verdicts,
                 license={"teacher": "Apache-2.0", "seed": "MIT", "template": "Apache-2.0", "logprobs": None},
                 error="teacher.http_500: Internal Server Error" if stream == "failed" else None)
        rows.append(r)
    return records.to_table(rows)


def build(root: Path, n: int) -> None:
    from datagen.config import Output
    from datagen.storage import create_store

    meta = {"name": "bench", "run_fingerprint": "bench", "job": {"teachers": [
        {"name": "t", "backend": "openai", "model": "m", "replicas": 2, "num_cpus": 1, "base_url": "http://x"}]}}
    store = create_store(root, Output(path=root, shard_rows=50_000), job_meta=meta)
    shares = {"accepted": 0.80, "rejected": 0.15, "failed": 0.05}
    for stream, share in shares.items():
        base = block(stream, 0)
        total = int(n * share)
        for start in range(0, total, BLOCK):
            take = min(BLOCK, total - start)
            ids = pa.array([f"{stream[0]}{start + i:031x}" for i in range(take)])
            store.add_table(stream, base.slice(0, take).set_column(0, base.schema.field(0), ids))
    store.commit_all()
    store.close()
    lines = [{"elapsed_s": t, "final": False, "stages": {
        "prompts": {"per_s": 50.0}, "teacher": {"rows_per_s": 46.0, "inflight_batches": 8, "ready_batches": 1},
        "filters": {"rows_per_s": 46.0, "inflight_batches": 2, "queued_batches": 0},
        "store": {"rows_per_s": 46.0, "pending": 900}}} for t in range(10, 10_800, 10)]
    lines.append({**lines[-1], "final": True, "stop_reason": None, "interrupted": False})
    (root / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=500_000)
    args = p.parse_args()
    from datagen.report import write_report

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "out"
        t = time.perf_counter()
        build(root, args.rows)
        built = time.perf_counter() - t
        data_mb = sum(f.stat().st_size for f in root.rglob("*.parquet")) / 1e6
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t = time.perf_counter()
        dest = Path(write_report(root))
        wall = time.perf_counter() - t
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        counts = json.loads((root / "manifest.json").read_text())
        rows = sum(s["rows"] for s in counts["shards"])
        print(f"output: {rows:,} rows in {len(counts['shards'])} shards, {data_mb:.1f} MB of Parquet (built in {built:.1f} s)")
        print(f"report: {wall:.1f} s wall, {dest.stat().st_size / 1e6:.2f} MB HTML, "
              f"peak RSS {rss1:.0f} MiB (before the report: {rss0:.0f} MiB)")


if __name__ == "__main__":
    main()
