"""Streaming dedupe: near-duplicates found while ``datagen run`` generates.

Each accepted row's MinHash signature and band keys are computed in the driver (the
bulk kernel in ``minhash``) and sent to ``IndexShard`` Ray actors. Every actor owns a
subset of the LSH bands and, for the rows assigned to it by id, their signature and
shingle-hash set. So the index is spread over the actors, and no process holds the
whole dataset. An actor answers, for each new row, the earlier rows that share a
bucket with it. The driver fetches their data, verifies each candidate (as in batch
mode) and joins verified pairs in a union-find over row ids, keyed so that each
cluster's root is its smallest row id.

**Keep rule.** The kept row of each cluster is its smallest row id, as in batch mode.
It is decided when the run completes, once every edge is known, and written as the
same view that ``datagen dedupe`` writes. An edge depends only on the two rows'
content, so the kept set does not depend on arrival order or on the number of actors.
Exception: a bucket of more than ``minhash.BIG_BUCKET`` members is compared cluster by
cluster, and there the order could in principle matter.

**Resume.** The index is rebuilt from the committed accepted rows before generation
continues, so a resumed run ends with the same clusters as an uninterrupted one.

**A lost index actor** (its process or node died) leaves the others with a partial
index, and a restarted actor would come back empty, so none is restarted. Instead the
whole index is rebuilt the way resume rebuilds it: fresh actors, and every row again from
``source`` (the driver's, run/driver.py: it commits the rows routed so far, then reads the committed
accepted rows). That costs a pass over the accepted rows, not rows or clusters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from datagen.dedupe import minhash
from datagen.config import Dedupe
from datagen.errors import DatagenError, remote_cause
from datagen.replicas import lost_work_errors

BATCH = 256
# Index rebuilds in a row, each after a lost actor, before the run stops; the waits
# between them give the cluster time to notice a lost node (Ray takes some seconds), so
# that new actors are not placed on it.
REBUILD_WAITS_S = (0.0, 5.0, 10.0, 20.0)


class IndexShard:
    """One actor's part of the LSH index (run as a Ray actor with num_cpus=0)."""

    def __init__(self, bands: list[int]):
        self.bands = bands
        self.tables: dict[int, dict[int, list[str]]] = {b: {} for b in bands}
        self.data: dict[str, tuple[bytes, bytes]] = {}  # row id -> (signature, shingle-hash set)

    def add(self, items: list[tuple[str, list[int], tuple[bytes, bytes] | None]]) -> list[list[str]]:
        """Index rows in order; for each, the earlier rows sharing one of its buckets."""
        out = []
        for rid, keys, payload in items:
            if payload is not None:
                self.data[rid] = payload
            found: set[str] = set()
            for band, key in zip(self.bands, keys):
                members = self.tables[band].setdefault(key, [])
                found.update(members)
                members.append(rid)
            out.append(sorted(found))
        return out

    def get(self, rids: list[str]) -> dict[str, tuple[bytes, bytes]]:
        return {r: self.data[r] for r in rids}

    def size(self) -> int:
        return len(self.data)


def _owner(rid: str, k: int) -> int:
    return int(rid[:8], 16) % k if all(c in "0123456789abcdef" for c in rid[:8]) else \
        int.from_bytes(rid.encode()[:8].ljust(8, b"\0"), "little") % k


class StreamingDedupe:
    """``source()`` yields (row id, text) of every row added so far: what a rebuild
    indexes again after a lost actor. Without one, a lost actor stops the run."""

    def __init__(self, cfg: Dedupe, source: Callable[[], Iterable[tuple[str, str]]] | None = None):
        self.cfg = cfg
        self.source = source
        self.shingling = minhash.Shingling(kind=cfg.shingle, n=cfg.ngram, lowercase=cfg.lowercase,
                                           strip_punct=cfg.strip_punct)
        self.a, self.b = minhash.permutations(cfg.num_perm, cfg.seed)
        self.bands, self.rows = minhash.lsh_params(cfg.threshold, cfg.num_perm, cfg.fp_weight, cfg.fn_weight)
        k = max(1, min(cfg.actors, self.bands))
        self.band_sets = [list(range(i, self.bands, k)) for i in range(k)]
        self.actors: list[Any] = []
        self.rebuilds = 0  # after lost actors
        self._start()

    def _start(self) -> None:
        """Fresh, empty index actors and union-find."""
        import ray

        remote = ray.remote(IndexShard).options(num_cpus=0, max_restarts=0)
        self.actors = [remote.remote(bs) for bs in self.band_sets]
        self.parent: dict[str, str] = {}
        self.pending: list[tuple[str, str]] = []
        self.checked = 0

    def load(self) -> None:
        """Index every row ``source`` yields (the committed rows, on resume)."""
        try:
            self._load()
        except lost_work_errors() as exc:
            self._rebuild(exc)

    def _load(self) -> None:
        chunk: list[tuple[str, str]] = []
        for row in self.source() if self.source else ():
            chunk.append(row)
            if len(chunk) >= BATCH:
                self._index(chunk)
                chunk = []
        if chunk:
            self._index(chunk)

    # -- union-find over row ids; the root of a cluster is its smallest id
    def _find(self, x: str) -> str:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def _union(self, x: str, y: str) -> None:
        rx, ry = self._find(x), self._find(y)
        if rx != ry:
            lo, hi = (rx, ry) if rx < ry else (ry, rx)
            self.parent[hi] = lo

    def add(self, row_id: str, text: str) -> None:
        self.pending.append((row_id, text))
        if len(self.pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            self._index(batch)
        except lost_work_errors() as exc:
            self._rebuild(exc)

    def _rebuild(self, exc: BaseException) -> None:
        """An index actor died: index every row again on fresh actors (see the module doc)."""
        import ray

        tries = 0
        while True:
            tries += 1
            if self.source is None or tries > len(REBUILD_WAITS_S):
                times = f" {tries} times in a row" if tries > 1 else ""
                raise DatagenError(
                    f"streaming dedupe lost an index actor{times} ({remote_cause(exc)}); committed rows are intact, "
                    "and `datagen resume` rebuilds the index from them")
            time.sleep(REBUILD_WAITS_S[tries - 1])
            for actor in self.actors:  # the survivors hold a partial index
                ray.kill(actor)
            self._start()
            self.rebuilds += 1
            try:
                self._load()
                return
            except lost_work_errors() as again:
                exc = again

    def _index(self, batch: list[tuple[str, str]]) -> None:
        import ray

        rids = [r for r, _ in batch]
        texts = [t for _, t in batch]
        for rid in rids:
            self.parent.setdefault(rid, rid)
        sig = minhash.signatures(texts, self.shingling, self.a, self.b)
        sets = [np.unique(minhash.shingle_hashes(t, self.shingling)) for t in texts]
        indexable = [i for i in range(len(batch)) if len(sets[i])]  # wordless texts: singletons
        if not indexable:
            return
        keys = minhash.band_keys(sig[indexable], self.bands, self.rows)
        local = {rids[i]: (sig[i], sets[i]) for i in indexable}
        k = len(self.actors)
        calls = []
        for ai, actor in enumerate(self.actors):
            items = [(rids[i], [int(keys[pos, bnd]) for bnd in self.band_sets[ai]],
                      (sig[i].tobytes(), sets[i].tobytes()) if _owner(rids[i], k) == ai else None)
                     for pos, i in enumerate(indexable)]
            calls.append(actor.add.remote(items))
        found = [set() for _ in indexable]
        for answer in ray.get(calls):
            for pos, cands in enumerate(answer):
                found[pos].update(cands)
        # fetch what the driver does not have: rows from earlier batches
        need = sorted({c for f in found for c in f if c not in local})
        by_owner: dict[int, list[str]] = {}
        for c in need:
            by_owner.setdefault(_owner(c, k), []).append(c)
        remote: dict[str, Any] = {}
        for got in ray.get([self.actors[o].get.remote(cs) for o, cs in by_owner.items()]):
            for c, (s, h) in got.items():
                remote[c] = (np.frombuffer(s, dtype=np.uint32), np.frombuffer(h, dtype=np.uint32))
        for pos, i in enumerate(indexable):
            self._join(rids[i], local[rids[i]], found[pos], local, remote)

    def _join(self, rid: str, mine: tuple[np.ndarray, np.ndarray], cands: set[str],
              local: dict[str, Any], remote: dict[str, Any]) -> None:
        """Verify ``rid`` against its candidates, a few per cluster when there are many."""
        groups: dict[str, list[str]] = {}
        for c in sorted(cands):
            groups.setdefault(self._find(c), []).append(c)
        limit = None if len(cands) <= minhash.BIG_BUCKET else minhash.BIG_BUCKET_TRIES
        for root in sorted(groups):
            for c in groups[root][:limit]:
                if self._find(c) == self._find(rid):
                    break
                other = local.get(c) or remote[c]
                self.checked += 1
                if self._similar(mine, other):
                    self._union(rid, c)
                    if limit is not None:
                        break

    def _similar(self, x: tuple[np.ndarray, np.ndarray], y: tuple[np.ndarray, np.ndarray]) -> bool:
        if self.cfg.verify == "exact":
            inter = len(np.intersect1d(x[1], y[1], assume_unique=True))
            union = len(x[1]) + len(y[1]) - inter
            return (inter / union if union else 1.0) >= self.cfg.threshold
        return float(np.mean(x[0] == y[0])) >= self.cfg.threshold

    def roots(self) -> dict[str, str]:
        """row id -> its cluster's smallest row id, for every row seen."""
        self.flush()
        return {r: self._find(r) for r in self.parent}

    def unique(self) -> int:
        return sum(1 for r in self.parent if self._find(r) == r)
