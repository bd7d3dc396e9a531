"""MinHash dedupe speed and memory, printed as figures (no assertions).

    .venv/bin/python benchmarks/bench_dedupe.py            # docs/s, big buckets, the 500k run
    .venv/bin/python benchmarks/bench_dedupe.py --big 0    # no 500k run

1. docs/s of signatures + LSH banding on 200-word documents: datagen (all cores) vs a
   plain datasketch ``MinHash.update`` loop over the same word 3-grams (sampled).
2. ``find_clusters`` on a corpus with big LSH buckets (default 6000 documents: templated
   answers, see ``make_templated``), and its clusters compared with an all-pairs exact
   check: the components of every pair whose exact Jaccard passes, LSH or not.
3. ``find_clusters`` over N documents (default 500k, 2% planted near-duplicates):
   wall time and peak RSS of this process plus its worker processes.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from collections.abc import Iterable, Sequence
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


def make_templated(n: int, seed: int = 0) -> tuple[list[str], list[str], dict[str, int]]:
    """Big buckets, as templated answers fill them: half near-copies of one 200-word answer
    (one word changed in its first half), then that answer and a real duplicate of it (7
    words changed in its second half: J=0.81 to the answer, 0.78 to each near-copy), then
    30% JSON-shaped answers (5 slots; one slot apart is J~0.83, two is ~0.7), the rest
    ``make_docs``. Ids follow that order, so every near-copy's id is below the answer's."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    answer = [rng.choice(vocab) for _ in range(200)]

    def changed(positions: Iterable[int]) -> str:
        w = list(answer)
        for p in positions:
            w[p] = rng.choice(vocab)
        return " ".join(w)

    copies, shaped = n // 2, int(n * 0.3)
    docs = [changed([rng.randrange(100)]) for _ in range(copies)]
    docs += [" ".join(answer), changed(range(110, 180, 10))]
    slots = [[rng.choice(vocab) for _ in range(6)] for _ in range(5)]
    for _ in range(shaped):
        v = [rng.choice(s) for s in slots]
        docs.append(f'{{"intent": "{v[0]}", "priority": "{v[1]}", "product": "{v[2]}", "sentiment": "{v[3]}", '
                    '"summary": "the customer reports that the app stops working after the latest update '
                    f'and asks for a refund or a fix", "language": "{v[4]}", "needs_human": true}}')
    docs += make_docs(max(n - len(docs), 0), seed=seed)
    ids = [f"{i:012d}" for i in range(len(docs))]
    return ids, docs, {"answer": copies, "duplicate": copies + 1}


def all_pairs_clusters(texts: Sequence[str], cfg: mh.Shingling, threshold: float) -> tuple[np.ndarray, int]:
    """Components of every pair whose exact Jaccard of shingle-hash sets (what
    ``verify="exact"`` measures) is >= threshold, by a sparse product in row blocks; a
    text with no shingles is nobody's duplicate. Returns each doc's component and the pairs."""
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    sets = [np.unique(mh.shingle_hashes(t, cfg)) for t in texts]
    sizes = np.array([len(x) for x in sets])
    _, cols = np.unique(np.concatenate(sets), return_inverse=True)
    rows = np.repeat(np.arange(len(sets)), sizes)
    x = sparse.csr_matrix((np.ones(len(cols), np.int32), (rows, cols)), shape=(len(sets), cols.max() + 1))
    src, dst = [], []
    for lo in range(0, len(sets), 512):
        inter = (x[lo:lo + 512] @ x.T).toarray()
        union = sizes[lo:lo + 512, None] + sizes[None, :] - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            i, j = np.nonzero((inter / union >= threshold) & (union > 0))
        src.append(i + lo)
        dst.append(j)
    graph = sparse.coo_matrix((np.ones(sum(map(len, src)), np.int8), (np.concatenate(src), np.concatenate(dst))),
                              shape=(len(sets), len(sets)))
    return connected_components(graph, directed=False)[1], len(sets) * (len(sets) - 1) // 2


def bench_bucket(n: int, workers: int) -> None:
    ids, docs, which = make_templated(n)
    cfg = mh.Shingling("word", 3)
    a, b = mh.permutations(128, 1)
    keys = mh.band_keys(mh.signatures(docs, cfg, a, b), *mh.lsh_params(0.8, 128, 0.05, 0.95))
    sizes = sorted((len(g) for g in mh.buckets(keys)), reverse=True)
    print(f"big-bucket corpus: {len(docs):,} docs; buckets over {mh.BIG_BUCKET}: "
          f"{sum(s > mh.BIG_BUCKET for s in sizes)}, biggest {sizes[0]:,}")
    mh.find_clusters(ids[:50], docs[:50])  # compile the kernel outside the timing
    t = time.perf_counter()
    cl = mh.find_clusters(ids, docs, workers=workers)
    dt = time.perf_counter() - t
    print(f"find_clusters on the big-bucket corpus: {dt:.2f} s ({len(docs) / dt:,.0f} docs/s), kept "
          f"{len(cl.kept()):,}, candidates checked {cl.candidates:,} ({cl.candidates / dt:,.0f} pairs/s)")
    t = time.perf_counter()
    expected, pairs = all_pairs_clusters(docs, cfg, 0.8)
    dt = time.perf_counter() - t
    same = len(set(zip(expected, cl.cluster_of))) == len(set(expected)) == len(set(cl.cluster_of))
    print(f"all-pairs exact check ({pairs:,} pairs, {dt:.1f} s): clusters equal: {same}; "
          f"the answer and its real duplicate together: "
          f"{cl.cluster_of[which['answer']] == cl.cluster_of[which['duplicate']]} "
          f"(all-pairs: {expected[which['answer']] == expected[which['duplicate']]})")


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
    p.add_argument("--bucket", type=int, default=6000, help="documents of the big-bucket corpus (0 skips it)")
    p.add_argument("--big", type=int, default=500_000, help="documents for the big run (0 skips it)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--only-big", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only_big:
        bench_big(args.big, args.workers)
        return
    print(f"python {sys.version.split()[0]}, cpus {os.cpu_count()}")
    bench_rate(args.rate_docs, args.workers)
    if args.bucket:
        bench_bucket(args.bucket, args.workers)
    if args.big:  # in a fresh process, so its peak RSS is its own
        import subprocess

        subprocess.run([sys.executable, __file__, "--only-big", "--big", str(args.big),
                        "--workers", str(args.workers)], check=True)


if __name__ == "__main__":
    main()
