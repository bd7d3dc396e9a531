"""``datagen dedupe OUTPUT_DIR``: near-duplicate clusters over committed shards.

Reads the accepted rows (through the manifest), clusters them with ``minhash`` and
writes, beside the source and without touching its shards, a *view*: a datagen store
holding one row per cluster (the smallest row id) with ``dedupe_cluster`` set, plus

* ``clusters.parquet``: every accepted row id, its cluster id and whether it was kept;
* ``report.json``: parameters, counts, the cluster-size histogram and a few examples.

The view is built in a temporary directory and renamed into place, and its manifest
lists the two side files' checksums, so ``datagen verify`` covers all of it.

Dedupe while ``datagen run`` generates, against an index spread over Ray actors, is
``streaming.py``'s; it writes the same view.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from datagen.dedupe import minhash
from datagen.config import Dedupe
from datagen.errors import OutputError
from datagen.storage import open_store
from datagen.storage.derived import build_store
from datagen.storage.shards import ShardStore


def row_text(messages: list[dict[str, str]], response: str | None, on: str) -> str:
    prompt = messages[-1]["content"] if messages else ""
    if on == "prompt":
        return prompt
    if on == "response":
        return response or ""
    return f"{prompt}\n{response or ''}"


@dataclass
class DedupeResult:
    dest: Path
    rows: int
    kept: int
    report: dict[str, Any]


def dedupe(src: Path, cfg: Dedupe, *, dest: Path | None = None, workers: int | None = None) -> DedupeResult:
    """Batch mode: cluster the committed accepted rows of ``src`` and write the view."""
    store = open_store(src)
    dest = dest or src / "dedupe"
    if dest.exists():  # checked again when the view is renamed into place; this saves the work
        raise OutputError(f"dedupe destination exists: {dest}; remove it or pass --to")
    start = time.perf_counter()
    table = store.read("accepted", columns=["row_id", "messages", "response"])
    ids = table.column("row_id").to_pylist()
    if len(set(ids)) != len(ids):
        raise OutputError(f"{src}: the accepted stream repeats row ids; `datagen verify {src}` first")
    texts = [row_text(m, r, cfg.on) for m, r in zip(table.column("messages").to_pylist(),
                                                     table.column("response").to_pylist())]
    del table
    cl = minhash.find_clusters(ids, texts, cfg=shingling(cfg), threshold=cfg.threshold, num_perm=cfg.num_perm,
                               seed=cfg.seed, fp_weight=cfg.fp_weight, fn_weight=cfg.fn_weight,
                               verify=cfg.verify, workers=workers or len(os.sched_getaffinity(0)))
    roots = {ids[i]: ids[c] for i, c in enumerate(cl.cluster_of)}
    text_of = dict(zip(ids, texts))
    del texts
    stats = {"mode": "batch", "exact_duplicates": cl.exact_duplicates, "candidate_pairs": cl.candidates,
             "verified_pairs": len(cl.edges), "seconds": round(time.perf_counter() - start, 3)}
    return write_view(store, roots, cfg, dest=dest, stats=stats, text_of=text_of)


def shingling(cfg: Dedupe) -> minhash.Shingling:
    return minhash.Shingling(kind=cfg.shingle, n=cfg.ngram, lowercase=cfg.lowercase, strip_punct=cfg.strip_punct)


def write_view(store: ShardStore, roots: dict[str, str], cfg: Dedupe, *, dest: Path, stats: dict[str, Any],
               text_of: dict[str, str] | None = None, replace: bool = False) -> DedupeResult:
    """Write the deduplicated view of ``store``'s accepted rows, given each row id's cluster
    root (its smallest member). ``replace`` swaps out an older view (streaming mode)."""
    ids = sorted(roots)
    sizes_by_root = Counter(roots.values())
    multi = {r for r, n in sizes_by_root.items() if n > 1}
    members: dict[str, list[str]] = {}
    for rid in ids:
        if roots[rid] in multi:
            members.setdefault(roots[rid], []).append(rid)
    examples = []
    for root in sorted(multi)[:5]:
        ex: dict[str, Any] = {"cluster": root, "size": len(members[root])}
        if text_of is not None:
            ex["kept"] = text_of[root][:300]
            ex["removed"] = [text_of[r][:300] for r in members[root] if r != root][:2]
        examples.append(ex)
    bands, rows = minhash.lsh_params(cfg.threshold, cfg.num_perm, cfg.fp_weight, cfg.fn_weight)
    kept = [r for r in ids if roots[r] == r]
    report = {
        "source": str(store.root), "rows": len(ids), "kept": len(kept), "removed": len(ids) - len(kept),
        **stats,
        "cluster_sizes": {str(k): v for k, v in sorted(Counter(sizes_by_root.values()).items())},
        "keep_rule": "smallest row_id of each cluster",
        "params": {"on": cfg.on, "threshold": cfg.threshold, "num_perm": cfg.num_perm, "seed": cfg.seed,
                   "bands": bands, "rows_per_band": rows, "shingle": cfg.shingle, "ngram": cfg.ngram,
                   "lowercase": cfg.lowercase, "strip_punct": cfg.strip_punct, "verify": cfg.verify},
        "examples": examples,
    }
    meta = store.job_meta()
    view_meta = {"name": meta["name"], "run_fingerprint": meta["run_fingerprint"], "job": meta.get("job"),
                 "job_file": None, "dedupe": report["params"] | {"source": str(store.root)}}
    target = dest.with_name(f".{dest.name}.new") if replace else dest
    if replace and target.exists():
        shutil.rmtree(target)
    with build_store(target, view_meta) as view:
        for table in store.iter_tables("accepted"):  # Arrow through: no dict per row
            rids = table.column("row_id").to_pylist()
            keep = [roots.get(rid) == rid for rid in rids]
            if not any(keep):
                continue
            table = table.filter(pa.array(keep))
            cluster = [rid if rid in multi else None for rid, k in zip(rids, keep) if k]
            at = table.schema.get_field_index("dedupe_cluster")
            view.add_table("accepted", table.set_column(at, table.schema.field(at), pa.array(cluster, pa.string())))
        pq.write_table(pa.table({"row_id": ids, "cluster": [roots[r] for r in ids],
                                 "kept": [roots[r] == r for r in ids]}),
                       view.root / "clusters.parquet", compression="zstd")
        view.attach("clusters.parquet")
        view.attach("report.json", json.dumps(report, indent=1))
    if replace:  # swap: the old view is removed only once the new one is complete
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            os.rename(dest, old)
        os.rename(target, dest)
        shutil.rmtree(old, ignore_errors=True)
    return DedupeResult(dest=dest, rows=len(ids), kept=len(kept), report=report)
