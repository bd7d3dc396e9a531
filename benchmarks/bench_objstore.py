"""Shard-store throughput on local disk vs an S3-compatible server, printed (no assertions).

    .venv/bin/python benchmarks/bench_objstore.py [--rows 5000]

Writes the same KD-sized rows (128 tokens x top-20 logprobs, as in bench_spine.py) to a
local output and to ``s3://`` on a moto server on 127.0.0.1, then reads every row back
through the manifest. moto is a single-threaded Python server, so the S3 figure is a
floor set by moto, not a measure of AWS; what it shows is the cost of the object-store
path (hash while uploading, manifest PUT per commit, lease checks) on the same machine.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_spine import kd_row  # noqa: E402


def run(root, n: int, pool: list[dict]) -> tuple[float, float, int, int]:
    from datagen.config import Output
    from datagen.storage import create_store, open_store

    meta = {"name": "b", "run_fingerprint": "b", "job": {}}
    store = create_store(root, Output(path=root, shard_rows=1000), job_meta=meta)
    t = time.perf_counter()
    for i in range(n):
        r = dict(pool[i % len(pool)])
        r["row_id"] = f"{i:032x}"
        store.add("accepted", r)
    store.commit_all()
    write_s = time.perf_counter() - t
    store.close()
    t = time.perf_counter()
    rows = sum(1 for _ in open_store(root).iter_rows("accepted"))
    read_s = time.perf_counter() - t
    return write_s, read_s, sum(s["bytes"] for s in store.manifest.shards), rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5000)
    n = ap.parse_args().rows
    from datagen.testing.s3 import MotoS3

    rng = random.Random(0)
    pool = [kd_row(i, rng) for i in range(256)]  # made once: time the store, not the maker
    print(f"## shard store, {n} KD rows, shards of 1000 rows")
    print(f"{'where':<8} {'write rows/s':>12} {'write MB/s':>10} {'read rows/s':>11} {'MB':>7}")
    with tempfile.TemporaryDirectory() as d, MotoS3(bucket="bench") as s3:
        os.environ.update(s3.env)
        for where, root in (("local", Path(d) / "o"), ("s3/moto", s3.url("o"))):
            write_s, read_s, size, rows = run(root, n, pool)
            assert rows == n
            print(f"{where:<8} {n / write_s:>12.0f} {size / 2**20 / write_s:>10.1f} {n / read_s:>11.0f} "
                  f"{size / 2**20:>7.1f}")


if __name__ == "__main__":
    main()
