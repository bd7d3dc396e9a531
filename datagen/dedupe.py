"""``datagen dedupe OUTPUT_DIR``: near-duplicate clusters over committed shards.

Reads the accepted rows (through the manifest), clusters them with ``minhash`` and
writes, beside the source and without touching its shards, a *view*: a datagen store
holding one row per cluster (the smallest row id) with ``dedupe_cluster`` set, plus

* ``clusters.parquet``: every accepted row id, its cluster id and whether it was kept;
* ``report.json``: parameters, counts, the cluster-size histogram and a few examples.

The view is built in a temporary directory and renamed into place, and its manifest
lists the two side files' checksums, so ``datagen verify`` covers all of it.

Not covered yet: the streaming mode (dedupe while ``datagen run`` generates, against an
index spread over Ray actors) -- see the dedupe issue.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from datagen import minhash
from datagen.config import Dedupe
from datagen.errors import OutputError
from datagen.shards import ShardStore, build_store


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
    store = ShardStore.open(src)
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
    shingling = minhash.Shingling(kind=cfg.shingle, n=cfg.ngram, lowercase=cfg.lowercase,
                                  strip_punct=cfg.strip_punct)
    cl = minhash.find_clusters(ids, texts, cfg=shingling, threshold=cfg.threshold, num_perm=cfg.num_perm,
                               seed=cfg.seed, fp_weight=cfg.fp_weight, fn_weight=cfg.fn_weight,
                               verify=cfg.verify, workers=workers or len(os.sched_getaffinity(0)))
    bands, rows = minhash.lsh_params(cfg.threshold, cfg.num_perm, cfg.fp_weight, cfg.fn_weight)
    sizes = Counter(cl.sizes().values())
    cluster_id = [ids[c] for c in cl.cluster_of]
    multi = {c for c, n in cl.sizes().items() if n > 1}
    examples = []
    for c in sorted(multi, key=lambda c: ids[c])[:5]:
        members = sorted((i for i, x in enumerate(cl.cluster_of) if x == c), key=ids.__getitem__)
        examples.append({"cluster": ids[c], "size": len(members), "kept": texts[c][:300],
                         "removed": [texts[i][:300] for i in members if i != c][:2]})
    report = {
        "source": str(src), "rows": len(ids), "kept": len(cl.kept()), "removed": len(ids) - len(cl.kept()),
        "exact_duplicates": cl.exact_duplicates, "candidate_pairs": cl.candidates,
        "verified_pairs": len(cl.edges),
        "cluster_sizes": {str(k): v for k, v in sorted(sizes.items())},
        "keep_rule": "smallest row_id of each cluster",
        "params": {"on": cfg.on, "threshold": cfg.threshold, "num_perm": cfg.num_perm, "seed": cfg.seed,
                   "bands": bands, "rows_per_band": rows, "shingle": cfg.shingle, "ngram": cfg.ngram,
                   "lowercase": cfg.lowercase, "strip_punct": cfg.strip_punct, "verify": cfg.verify},
        "seconds": round(time.perf_counter() - start, 3),
        "examples": examples,
    }
    kept_of = {ids[i]: (cluster_id[i] if cl.cluster_of[i] in multi else None)
               for i in cl.kept()}
    del texts

    meta = store.job_meta()
    view_meta = {"name": meta["name"], "run_fingerprint": meta["run_fingerprint"], "job": meta.get("job"),
                 "job_file": None, "dedupe": report["params"] | {"source": str(src)}}
    with build_store(dest, view_meta) as view:
        for row in store.iter_rows("accepted"):
            if row["row_id"] in kept_of:
                row["dedupe_cluster"] = kept_of[row["row_id"]]
                view.add("accepted", row)
        pq.write_table(pa.table({"row_id": ids, "cluster": cluster_id,
                                 "kept": [cl.cluster_of[i] == i for i in range(len(ids))]}),
                       view.root / "clusters.parquet", compression="zstd")
        view.attach("clusters.parquet")
        view.attach("report.json", json.dumps(report, indent=1))
    return DedupeResult(dest=dest, rows=len(ids), kept=len(cl.kept()), report=report)
