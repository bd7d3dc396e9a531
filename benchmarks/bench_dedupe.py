"""MinHash dedupe speed and memory, printed as figures (no assertions).

    .venv/bin/python benchmarks/bench_dedupe.py            # docs/s + the 500k run
    .venv/bin/python benchmarks/bench_dedupe.py --big 0    # docs/s only

1. docs/s of signatures + LSH banding on 200-word documents: datagen (all cores) vs a
   plain datasketch ``MinHash.update`` loop over the same word 3-grams (sampled).
2. ``find_clusters`` over N documents (default 500k, 2% planted near-duplicates):
   wall time and peak RSS of this process plus its worker processes.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from datagen.dedupe import minhash as mh  # noqa: E402


def make_docs(n: int, words: int = 200, dup_rate: float = 0.02, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    vocab = np.array(["".join(prng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(prng.randint(2, 9)))
                      for _ in range(50_000)], dtype=object)
    docs = []
    for start in range(0, n, 10_000):  # in blocks: a full (n x words) index array would dwarf the rest
        idx = rng.integers(0, len(vocab), size=(min(10_000, n - start), words))
        docs += [" ".join(vocab[row]) for row in idx]
    for i in rng.choice(n, size=int(n * dup_rate), replace=False):  # near-copies of another doc
        w = docs[(i + 1) % n].split()
        for k in rng.choice(words, size=4, replace=False):
            w[k] = vocab[rng.integers(0, len(vocab))]
        docs[i] = " ".join(w)
    return docs


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_mb() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def bench_rate(n: int, workers: int) -> None:
    docs = make_docs(n)
    cfg = mh.Shingling("word", 3)
    a, b = mh.permutations(128, 1)
    mh.signatures(docs[:8], cfg, a, b)  # compile the kernel outside the timing
    bands, rows = mh.lsh_params(0.8, 128, 0.05, 0.95)
    t = time.perf_counter()
    sig = mh.signatures_parallel(docs, cfg, a, b, workers=workers)
    cands = mh.candidate_pairs(mh.band_keys(sig, bands, rows))
    dt = time.perf_counter() - t
    print(f"datagen signatures+LSH: {n / dt:,.0f} docs/s ({n} docs of 200 words, {workers} workers, "
          f"{bands}x{rows} bands, {len(cands)} candidate pairs)")

    from datasketch import MinHash, MinHashLSH

    sample = docs[:2000]
    t = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=128, weights=(0.05, 0.95))
    for i, d in enumerate(sample):
        m = MinHash(num_perm=128, seed=1)
        w = d.split()
        for k in range(len(w) - 2):
            m.update(" ".join(w[k:k + 3]).encode())
        lsh.insert(str(i), m)
    dt = time.perf_counter() - t
    print(f"plain datasketch update loop + MinHashLSH.insert: {len(sample) / dt:,.0f} docs/s (1 process, "
          f"{len(sample)} docs)")


def bench_big(n: int, workers: int) -> None:
    t = time.perf_counter()
    docs = make_docs(n)
    ids = [f"{i:012d}" for i in range(n)]
    base = _rss_now_mb()
    print(f"generated {n:,} docs in {time.perf_counter() - t:.1f} s (not counted); RSS with the documents "
          f"loaded: {base:,.0f} MB")
    t = time.perf_counter()
    cl = mh.find_clusters(ids, docs, workers=workers)
    dt = time.perf_counter() - t
    own, kids = rss_mb()
    print(f"find_clusters on {n:,} docs: {dt:.1f} s ({n / dt:,.0f} docs/s), kept {len(cl.kept()):,}, "
          f"exact dups {cl.exact_duplicates}, candidates {cl.candidates:,}, verified pairs {len(cl.edges):,}")
    print(f"peak RSS: this process {own:,.0f} MB (documents included), largest worker {kids:,.0f} MB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate-docs", type=int, default=100_000)
    p.add_argument("--big", type=int, default=500_000, help="documents for the big run (0 skips it)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only-big", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only_big:
        bench_big(args.big, args.workers)
        return
    print(f"python {sys.version.split()[0]}, cpus {os.cpu_count()}")
    bench_rate(args.rate_docs, args.workers)
    if args.big:  # in a fresh process, so its peak RSS is its own
        import subprocess

        subprocess.run([sys.executable, __file__, "--only-big", "--big", str(args.big),
                        "--workers", str(args.workers)], check=True)


if __name__ == "__main__":
    main()
