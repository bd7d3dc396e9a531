"""MinHash signatures, LSH banding and duplicate clusters.

Signatures follow datasketch's default ``affine32`` scheme exactly: a shingle hash ``h``
is pre-mixed with the MurmurHash3 finalizer, and permutation ``p`` maps it to
``a_p * h + b_p mod 2^32``, with ``(a, b)`` taken from ``datasketch.MinHash(num_perm,
seed).permutations``. A document's signature is the per-permutation minimum over its
shingles. ``tests/test_minhash.py`` checks that our vectorised path gives exactly the
signature of a ``datasketch.MinHash`` updated shingle by shingle with ``shingle_hash``.

Why not datasketch's own ``update``: a per-shingle Python call runs under 1k docs/s on
200-word documents. Here shingles are hashed in bulk (word hashes cached, n-grams
combined in numpy) and the permutation/min step runs in one fused loop (numba when it
is installed, which the ``cpu``/``gpu`` extras bring; a chunked numpy path otherwise).

LSH banding uses datasketch's ``_optimal_param`` to choose bands and rows from the
false-positive / false-negative weights, then groups documents whose band slices are
equal. Candidates are verified (exact Jaccard of the sets of 32-bit shingle hashes by
default -- a hash collision moves one pair's Jaccard by at most 1/|union| -- or the
signature estimate), and verified pairs are joined with union-find. The clusters are
exactly the connected components of the candidate pairs that pass the check: a bucket of
more than ``BIG_BUCKET`` documents skips pairs already in one cluster and pairs the
triangle inequality rules out (``big_buckets``), never a pair that could pass. Pairs the
LSH never makes candidates (a pair at J=0.8 shares no band with p=0.05) are not clusters'
edges: the clusters are not those of every pair over the threshold.

The kept row of each cluster is the one with the smallest row id. The clusters depend
only on the set of documents, never on their order, on how many workers ran, or on
``PYTHONHASHSEED`` (nothing here uses Python's ``hash()``).

Long: signatures, banding and verified clustering share one data layout (shingle hash
sets, signature matrices) and are tested against datasketch together; the big-bucket
walk is ``big_buckets.py``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from datagen.dedupe.big_buckets import cluster_bucket

MASK32 = 0xFFFFFFFF
BIG_BUCKET = 256  # above this, find_clusters verifies a bucket through big_buckets (exact)
BIG_BUCKET_TRIES = 8  # streaming only: members tried per cluster in a bucket above BIG_BUCKET
_M1 = 0x9E3779B1  # n-gram combination multiplier (odd)
_NONWORD = re.compile(r"[^\w\s]+")
# The same classes for ASCII text, built from the regex itself so both paths agree.
_ASCII_NONWORD = {c: " " for c in range(128) if _NONWORD.fullmatch(chr(c))}


@dataclass(frozen=True)
class Shingling:
    kind: Literal["word", "char"] = "word"
    n: int = 3
    lowercase: bool = True
    strip_punct: bool = True  # word shingles only ever see \w+ tokens; char shingles drop punctuation

    def normalise(self, text: str) -> str:
        return " ".join(self.words(text))

    def words(self, text: str) -> list[str]:
        if text.isascii():  # the common case: NFKC is the identity, a table replaces the regex
            if self.lowercase:
                text = text.lower()
            return (text.translate(_ASCII_NONWORD) if self.strip_punct else text).split()
        text = unicodedata.normalize("NFKC", text)
        if self.lowercase:
            text = text.lower()
        return (_NONWORD.sub(" ", text) if self.strip_punct else text).split()


# ------------------------------------------------------------------ shingle hashes

_FNV_OFFSET, _FNV_PRIME = 0x811C9DC5, 0x01000193


def word_hash(word: str) -> int:
    """FNV-1 (32-bit) over the word's code points: simple enough to run inside the fused
    numba kernel, so words never need a Python-level hash there."""
    h = _FNV_OFFSET
    for ch in word:
        h = ((h * _FNV_PRIME) & MASK32) ^ ord(ch)
    return h


class _WordHasher:
    """word -> ``word_hash(word)``, cached for the numpy path: corpora repeat their words."""

    def __init__(self, limit: int = 2_000_000):
        self.cache: dict[str, int] = {}
        self.limit = limit

    def __call__(self, word: str) -> int:
        h = self.cache.get(word)
        if h is None:
            if len(self.cache) >= self.limit:
                self.cache.clear()
            h = self.cache[word] = word_hash(word)
        return h

    def many(self, words: list[str]) -> list[int]:
        try:  # the common case, every word seen before: one C-level pass
            return list(map(self.cache.__getitem__, words))
        except KeyError:
            return [self(w) for w in words]


_word_hash = _WordHasher()


def _combine(parts: Sequence[int]) -> int:
    """The reference n-gram combination: g = ((g * M1) ^ next) mod 2^32."""
    g = parts[0]
    for x in parts[1:]:
        g = ((g * _M1) & MASK32) ^ x
    return g


class CharShingle(tuple):
    """A character n-gram: a tuple of 1-character strings."""


def shingle_hash(shingle: tuple[Any, ...]) -> int:
    """Reference hash of one shingle, for datasketch's ``hashfunc`` (tests, and anyone who
    wants datasketch objects equal to ours): a tuple of words, or a ``CharShingle``."""
    if isinstance(shingle, CharShingle):
        return _combine([ord(c) for c in shingle])
    return _combine([_word_hash(w) for w in shingle])


def shingles(text: str, cfg: Shingling) -> list[tuple[Any, ...]]:
    """The reference shingle list (slow; for tests and small inputs)."""
    if cfg.kind == "word":
        words = cfg.words(text)
        if len(words) < cfg.n:
            return [tuple(words)] if words else []
        return [tuple(words[i:i + cfg.n]) for i in range(len(words) - cfg.n + 1)]
    norm = cfg.normalise(text)
    if len(norm) < cfg.n:
        return [CharShingle(norm)] if norm else []
    return [CharShingle(norm[i:i + cfg.n]) for i in range(len(norm) - cfg.n + 1)]


def _ngram_hashes(units: np.ndarray, n: int) -> np.ndarray:
    """Vectorised ``_combine`` over every window of ``n`` units (uint32)."""
    if len(units) < n:
        if len(units) == 0:
            return units
        g = units[:1].copy()
        for k in range(1, len(units)):
            g = (g * np.uint32(_M1)) ^ units[k:k + 1]
        return g
    m = len(units) - n + 1
    g = units[:m].copy()
    for k in range(1, n):
        g = (g * np.uint32(_M1)) ^ units[k:k + m]
    return g


def shingle_hashes(text: str, cfg: Shingling) -> np.ndarray:
    """All shingle hashes of ``text`` as uint32 (duplicates kept: min() ignores them)."""
    with np.errstate(over="ignore"):
        if cfg.kind == "word":
            units = np.array(_word_hash.many(cfg.words(text)), dtype=np.uint32)
        else:
            units = np.frombuffer(cfg.normalise(text).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        return _ngram_hashes(units, cfg.n)


# ------------------------------------------------------------------ signatures

def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own permutation parameters (affine32) for this seed."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _numba_kernel():
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(nogil=True, cache=False)
    def kernel(h, ends, a, b, out):  # pragma: no cover - compiled
        start = 0
        for d in range(ends.shape[0]):
            for p in range(a.shape[0]):
                out[d, p] = np.uint32(0xFFFFFFFF)
            for i in range(start, ends[d]):
                x = np.uint64(h[i])
                for p in range(a.shape[0]):
                    v = np.uint32((np.uint64(a[p]) * x + np.uint64(b[p])) & np.uint64(0xFFFFFFFF))
                    if v < out[d, p]:
                        out[d, p] = v
            start = ends[d]

    return kernel


def _numba_word_kernel():
    """Word n-gram signatures straight from code points, in one pass per document:
    FNV-1 word hashes -> n-gram combination -> fmix32 -> the num_perm minima."""
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(nogil=True, cache=False)
    def kernel(cps, ends, n, a, b, out):  # pragma: no cover - compiled
        mask = np.uint64(0xFFFFFFFF)
        ring = np.zeros(64, dtype=np.uint64)
        start = 0
        for d in range(ends.shape[0]):
            for p in range(a.shape[0]):
                out[d, p] = np.uint32(0xFFFFFFFF)
            words = 0
            h = np.uint64(0x811C9DC5)
            in_word = False
            for i in range(start, ends[d] + 1):
                c = np.uint64(cps[i]) if i < ends[d] else np.uint64(32)
                space = c == 32 or (9 <= c <= 13) or (28 <= c <= 31)
                if not space:
                    h = ((h * np.uint64(0x01000193)) & mask) ^ c
                    in_word = True
                    continue
                if not in_word:
                    continue
                ring[words % 64] = h
                words += 1
                h = np.uint64(0x811C9DC5)
                in_word = False
                if words < n:
                    continue
                g = ring[(words - n) % 64]
                for k in range(1, n):
                    g = ((g * np.uint64(0x9E3779B1)) & mask) ^ ring[(words - n + k) % 64]
                _update(g, a, b, out, d)
            if 0 < words < n:  # a document shorter than n: one shingle of all its words
                g = ring[0]
                for k in range(1, words):
                    g = ((g * np.uint64(0x9E3779B1)) & mask) ^ ring[k]
                _update(g, a, b, out, d)
            start = ends[d]

    @numba.njit(nogil=True, inline="always")
    def _update(g, a, b, out, d):  # pragma: no cover - compiled
        mask = np.uint64(0xFFFFFFFF)
        x = g ^ (g >> np.uint64(16))
        x = (x * np.uint64(0x85EBCA6B)) & mask
        x = x ^ (x >> np.uint64(13))
        x = (x * np.uint64(0xC2B2AE35)) & mask
        x = x ^ (x >> np.uint64(16))
        for p in range(a.shape[0]):
            v = np.uint32((np.uint64(a[p]) * x + np.uint64(b[p])) & mask)
            if v < out[d, p]:
                out[d, p] = v

    return kernel


_KERNEL: Any = "unset"
_WORD_KERNEL: Any = "unset"


def _fused_word_signatures(texts: Sequence[str], cfg: Shingling, a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    global _WORD_KERNEL
    if _WORD_KERNEL == "unset":
        _WORD_KERNEL = _numba_word_kernel()
    if _WORD_KERNEL is None or cfg.n > 64:
        return None
    parts = []
    for t in texts:
        if t.isascii():  # words() without building the word list: the kernel splits
            if cfg.lowercase:
                t = t.lower()
            parts.append(t.translate(_ASCII_NONWORD) if cfg.strip_punct else t)
        else:  # non-ASCII: normalise in Python, rejoin with plain spaces
            parts.append(" ".join(cfg.words(t)))
    ends = np.cumsum([len(p) for p in parts], dtype=np.int64)
    cps = np.frombuffer("".join(parts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    out = np.empty((len(parts), len(a)), dtype=np.uint32)
    _WORD_KERNEL(cps, ends, cfg.n, a, b, out)
    return out


def _minimums(h: np.ndarray, lens: np.ndarray, a: np.ndarray, b: np.ndarray, *, use_numba: bool | None) -> np.ndarray:
    global _KERNEL
    out = np.empty((len(lens), len(a)), dtype=np.uint32)
    ends = np.cumsum(lens).astype(np.int64)
    if use_numba is not False:
        if _KERNEL == "unset":
            _KERNEL = _numba_kernel()
        if _KERNEL is not None:
            _KERNEL(h, ends, a, b, out)
            return out
        if use_numba:
            raise RuntimeError("numba is not installed")
    # numpy: (shingles x perms) blocks of at most ~4M values; empty docs stay at max.
    out.fill(MASK32)
    lo = 0
    while lo < len(lens):
        hi, budget = lo, max(1, (1 << 22) // max(len(a), 1))
        while hi < len(lens) and (hi == lo or ends[hi] - (ends[lo] - lens[lo]) <= budget):
            hi += 1
        sub = lens[lo:hi]
        nonempty = sub > 0
        if nonempty.any():
            base = ends[lo] - lens[lo]
            starts = (ends[lo:hi] - sub)[nonempty] - base
            with np.errstate(over="ignore"):
                phv = h[base:ends[hi - 1], None] * a[None, :] + b[None, :]
            out[lo:hi][nonempty] = np.minimum.reduceat(phv, starts, axis=0)
        lo = hi
    return out


def _batch_hashes(texts: Sequence[str], cfg: Shingling) -> tuple[np.ndarray, np.ndarray]:
    """Every shingle hash of a batch of documents, concatenated, and each document's count.

    Word shingles are hashed for the whole batch at once (one array, n-gram windows that
    cross a document boundary masked out) to avoid per-document numpy overhead.
    """
    if cfg.kind != "word":
        parts = [shingle_hashes(t, cfg) for t in texts]
        lens = np.array([len(p) for p in parts], dtype=np.int64)
        return (np.concatenate(parts) if parts else np.empty(0, np.uint32)), lens
    tokens: list[str] = []
    counts = []
    for t in texts:
        w = cfg.words(t)
        tokens += w
        counts.append(len(w))
    c = np.array(counts, dtype=np.int64)
    u = np.array(_word_hash.many(tokens), dtype=np.uint32)
    n = cfg.n
    lens = np.where(c >= n, c - n + 1, np.minimum(c, 1))
    if len(u) == 0:
        return u, lens
    with np.errstate(over="ignore"):
        m = max(len(u) - n + 1, 0)
        g = u[:m].copy()
        for k in range(1, n):
            g = (g * np.uint32(_M1)) ^ u[k:k + m]
        starts = np.cumsum(c) - c
        # window p belongs to the document holding token p; keep it if it ends inside it
        doc = np.repeat(np.arange(len(c)), c)[:m]
        keep = (np.arange(m) - starts[doc]) <= (c[doc] - n)
        h = g[keep]
    short = np.flatnonzero((c > 0) & (c < n))
    if len(short):  # documents shorter than n: one shingle of all their words
        pieces, at = [], 0
        for d in range(len(c)):
            if lens[d] == 0:
                continue
            if c[d] < n:
                pieces.append(_ngram_hashes(u[starts[d]:starts[d] + c[d]], n))
            else:
                pieces.append(h[at:at + lens[d]])
                at += lens[d]
        h = np.concatenate(pieces)
    return h, lens


def signatures(texts: Iterable[str], cfg: Shingling, a: np.ndarray, b: np.ndarray, *,
               chunk: int = 512, use_numba: bool | None = None) -> np.ndarray:
    """(n_docs, num_perm) uint32 MinHash signatures, equal to datasketch's."""
    out = []
    batch: list[str] = []

    def flush() -> None:
        if cfg.kind == "word" and use_numba is not False and len(a):
            fused = _fused_word_signatures(batch, cfg, a, b)
            if fused is not None:
                out.append(fused)
                batch.clear()
                return
        h, lens = _batch_hashes(batch, cfg)
        with np.errstate(over="ignore"):
            h = _fmix32(h.astype(np.uint32))
        out.append(_minimums(h, lens, a, b, use_numba=use_numba if len(a) * len(h) > 0 else False))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= chunk:
            flush()
    if batch:
        flush()
    return np.concatenate(out) if out else np.empty((0, len(a)), np.uint32)


_SHARED: tuple | None = None  # (texts, cfg, a, b), inherited by forked workers, never pickled


def _signature_job(span: tuple[int, int]) -> np.ndarray:
    texts, cfg, a, b = _SHARED
    return signatures(texts[span[0]:span[1]], cfg, a, b)


def signatures_parallel(texts: Sequence[str], cfg: Shingling, a: np.ndarray, b: np.ndarray, *,
                        workers: int = 1, chunk: int = 8192) -> np.ndarray:
    """``signatures`` over ``workers`` forked processes (same result, in input order).

    The texts reach the workers through fork's copy-on-write memory, not through pickles.
    """
    global _SHARED
    import multiprocessing as mp

    if workers <= 1 or len(texts) < 2 * chunk or "fork" not in mp.get_all_start_methods():
        return signatures(texts, cfg, a, b)
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    signatures(texts[:1], cfg, a, b)  # compile the kernel once, before the fork copies it
    _SHARED = (texts, cfg, a, b)
    try:
        spans = [(i, min(i + chunk, len(texts))) for i in range(0, len(texts), chunk)]
        out = np.empty((len(texts), len(a)), dtype=np.uint32)
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            # A window of 2 chunks per worker in flight: results never pile up in memory.
            pending: dict[Any, tuple[int, int]] = {}
            todo = iter(spans)
            for span in todo:
                pending[pool.submit(_signature_job, span)] = span
                if len(pending) >= 2 * workers:
                    break
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    lo, hi = pending.pop(fut)
                    out[lo:hi] = fut.result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending[pool.submit(_signature_job, nxt)] = nxt
        return out
    finally:
        _SHARED = None


# ------------------------------------------------------------------ LSH + clusters

def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows) minimising the weighted FP/FN probability, as datasketch chooses them."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, fp_weight, fn_weight)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) uint64 keys: equal band slices give equal keys."""
    n = sig.shape[0]
    keys = np.empty((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            k = np.full(n, np.uint64(band) * np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64)
            for col in sig[:, band * rows:(band + 1) * rows].T:
                k = (k ^ col.astype(np.uint64)) * np.uint64(0x100000001B3)
            keys[:, band] = k
    return keys


def buckets(keys: np.ndarray) -> Iterator[list[int]]:
    """Sorted members of every bucket that holds two or more documents, band by band."""
    n = keys.shape[0]
    for band in range(keys.shape[1]):
        col = keys[:, band]
        order = np.argsort(col, kind="stable")
        sorted_keys = col[order]
        starts = np.concatenate(([0], np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1))
        lengths = np.diff(np.concatenate((starts, [n])))
        for s, length in zip(starts[lengths > 1].tolist(), lengths[lengths > 1].tolist()):
            yield sorted(order[s:s + length].tolist())


def candidate_pairs(keys: np.ndarray) -> set[tuple[int, int]]:
    """Index pairs (i < j) that share a bucket in at least one band (small inputs only:
    quadratic in bucket size; ``find_clusters`` walks buckets without building this)."""
    pairs: set[tuple[int, int]] = set()
    for g in buckets(keys):
        pairs.update((g[i], g[j]) for i in range(len(g)) for j in range(i + 1, len(g)))
    return pairs


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


def jaccard(x: set, y: set) -> float:
    return len(x & y) / len(x | y) if x or y else 1.0


@dataclass
class Clusters:
    """Duplicate clusters over documents 0..n-1, keyed by their ids."""

    ids: list[str]
    cluster_of: list[int]  # index of the kept (smallest-id) member of each doc's cluster
    # Verified pairs. Every passing candidate pair of buckets up to BIG_BUCKET; in a bigger
    # bucket only those verified before their ends were in one cluster (enough to join it).
    edges: set[tuple[int, int]] = field(default_factory=set)
    exact_duplicates: int = 0
    candidates: int = 0  # distinct pairs verified

    def kept(self) -> list[int]:
        return [i for i, c in enumerate(self.cluster_of) if c == i]

    def sizes(self) -> dict[int, int]:
        from collections import Counter

        return dict(Counter(self.cluster_of))


def find_clusters(ids: Sequence[str], texts: Sequence[str], *, cfg: Shingling = Shingling(),
                  threshold: float = 0.8, num_perm: int = 128, seed: int = 1,
                  fp_weight: float = 0.05, fn_weight: float = 0.95,
                  verify: Literal["exact", "estimate"] = "exact",
                  use_numba: bool | None = None, workers: int = 1) -> Clusters:
    """Near-duplicate clusters of ``texts``; each keeps its smallest id.

    The default weights favour recall (16 bands x 8 rows at 0.8: a pair at J=0.8 is a
    candidate with p=0.95): every candidate is verified, so a false candidate costs a
    check, while a missed one is a duplicate left in the data.

    The documents are sorted by id first, so the result depends only on the set of
    (id, text) pairs, not on their order.
    """
    if len(set(ids)) != len(ids):
        raise ValueError("find_clusters needs unique ids")
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    stext = [texts[i] for i in order]
    n = len(stext)
    uf = UnionFind(n)
    # 1. exact duplicates of the normalised text, by content hash. A text with no words
    #    left (empty, punctuation, emoji) has no shingles and is nobody's duplicate.
    first: dict[int, int] = {}
    exact = 0
    for i, t in enumerate(stext):
        norm = cfg.normalise(t)
        if len(norm) == 0:
            continue
        key = int.from_bytes(hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=12).digest(),
                             "little")
        if key in first:
            uf.union(first[key], i)
            exact += 1
        else:
            first[key] = i
    reps = sorted(first.values())
    # 2. MinHash LSH over one representative per exact group
    a, b = permutations(num_perm, seed)
    rep_texts = [stext[i] for i in reps]
    sig = (signatures(rep_texts, cfg, a, b, use_numba=use_numba) if workers <= 1
           else signatures_parallel(rep_texts, cfg, a, b, workers=workers))
    del rep_texts
    bands, rows = lsh_params(threshold, num_perm, fp_weight, fn_weight)
    edges: set[tuple[int, int]] = set()
    checked: set[tuple[int, int]] = set()
    sets: dict[int, np.ndarray] = {}  # sorted unique shingle hashes: ~1 KB a document, not ~30 KB

    def check(x: int, y: int) -> tuple[bool, float]:
        """Verify candidate (x, y), indices into ``reps`` with x < y: (similar, distance)."""
        checked.add((x, y))
        i, j = reps[x], reps[y]
        if verify == "exact":
            for k in (i, j):
                if k not in sets:
                    sets[k] = np.unique(shingle_hashes(stext[k], cfg))
            inter = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
            union = len(sets[i]) + len(sets[j]) - inter
            sim = inter / union if union else 1.0
        else:
            sim = float(np.mean(sig[x] == sig[y]))
        if sim >= threshold:
            edges.add((i, j))
            uf.union(i, j)
        return sim >= threshold, 1.0 - sim

    for members in buckets(band_keys(sig, bands, rows)):
        if len(members) <= BIG_BUCKET:  # every pair, each checked once over all bands
            for jj in range(1, len(members)):
                for ii in range(jj):
                    if (members[ii], members[jj]) not in checked:
                        check(members[ii], members[jj])
            continue
        # A huge bucket (templated answers): exact clusters without every pair (big_buckets).
        cluster_bucket(members, radius=1.0 - threshold, root=lambda x: uf.find(reps[x]), check=check)
    roots = [uf.find(i) for i in range(n)]  # the root is the smallest index = smallest id
    cluster_of = [0] * n
    for pos, i in enumerate(order):
        cluster_of[i] = order[roots[pos]]
    orig_edges = {tuple(sorted((order[i], order[j]))) for i, j in edges}
    return Clusters(ids=list(ids), cluster_of=cluster_of, edges=orig_edges, exact_duplicates=exact,
                    candidates=len(checked))
