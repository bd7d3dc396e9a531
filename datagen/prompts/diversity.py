"""The diversity report of a prompt plan: axis histograms against their quotas, distinct-n
over a sample of prompts, and the distribution of pairwise MinHash similarity in a
smaller sample. Shown by ``datagen preview``, written to ``OUT/prompts_report.json`` by
``datagen run`` and read back by ``datagen inspect``.

distinct-n and similarity measure ``clean.compared_text`` (the last user turn), the text
prompt dedupe compares: a system turn or worked examples every prompt shares would make
distinct prompts look alike. Not covered: variety an axis puts only in the system turn
shows in the axis histograms, not in these figures."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from datagen.dedupe import minhash
from datagen.prompts.clean import compared_text

REPORT_FILE = "prompts_report.json"
SAMPLE = 1000  # prompts for distinct-n
PAIR_SAMPLE = 200  # prompts for pairwise similarity (~20k pairs)
BINS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0001]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams (1.0: no n-gram repeats)."""
    seen: set[tuple[str, ...]] = set()
    total = 0
    shingling = minhash.Shingling(kind="word")
    for t in texts:
        w = shingling.words(t)
        grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return round(len(seen) / total, 4) if total else 0.0


def similarity(texts: list[str], *, num_perm: int = 128) -> dict[str, Any]:
    """Estimated Jaccard (word 3-grams) of every pair of ``texts``, summarised."""
    if len(texts) < 2:
        return {"pairs": 0}
    a, b = minhash.permutations(num_perm, 1)
    sig = minhash.signatures(texts, minhash.Shingling(kind="word", n=3), a, b)
    sims = np.concatenate([(sig[i] == sig[i + 1:]).mean(axis=1) for i in range(len(texts) - 1)])
    hist, _ = np.histogram(sims, bins=BINS)
    return {
        "pairs": int(len(sims)), "mean": round(float(sims.mean()), 4),
        "p50": round(float(np.quantile(sims, 0.5)), 4), "p90": round(float(np.quantile(sims, 0.9)), 4),
        "p99": round(float(np.quantile(sims, 0.99)), 4), "max": round(float(sims.max()), 4),
        "at_or_above_0.8": round(float((sims >= 0.8).mean()), 4),
        "histogram": {f"{lo:.1f}-{min(hi, 1.0):.1f}": int(n) for lo, hi, n in zip(BINS, BINS[1:], hist)},
    }


def report(stream: Any, *, seed: int = 0) -> dict[str, Any]:
    plan = stream.plan
    n = len(plan.slots)
    total = max(n, 1)
    pick = sorted(random.Random(seed).sample(range(n), min(n, SAMPLE)))
    texts = [compared_text(stream.prompt(k)[0]) for k in pick]
    pairs = texts if len(texts) <= PAIR_SAMPLE else random.Random(seed + 1).sample(texts, PAIR_SAMPLE)
    return {
        "prompts": n,
        "plan": plan.report,
        "axes": {axis: {v: {"count": c, "share": round(c / total, 4), "target": round(plan.targets[axis][v], 4)}
                        for v, c in hist.items()} for axis, hist in plan.histogram().items()},
        "distinct_n": {f"distinct_{k}": distinct_n(texts, k) for k in (1, 2, 3)},
        "similarity": similarity(pairs),
        "sample_size": len(texts),
    }


def lines(rep: dict[str, Any]) -> list[str]:
    """The report as short lines for a terminal."""
    p = rep["plan"]
    cont = ", ".join(f"{k} {v}" for k, v in p["contaminated_seeds"].items()) or "0"
    out = [f"prompts: {rep['prompts']} planned of {p['requested']} requested from {p['seeds']} seeds "
           f"({p['candidates']} rendered); seeds dropped: near-duplicates {p['near_duplicate_seeds']}, "
           f"contaminated {cont}; exact duplicate prompts replaced {p['exact_duplicate_prompts']}"
           + (f"; unfilled {p['unfilled']}" if p["unfilled"] else "")]
    if p["bad_seed_rows"]:
        out.append(f"bad seed rows skipped: {len(p['bad_seed_rows'])}: " + "; ".join(p["bad_seed_rows"][:5]))
    for axis, hist in rep["axes"].items():
        out.append(f"axis {axis}: " + ", ".join(f"{v} {h['share']:.1%} (target {h['target']:.1%})"
                                                for v, h in hist.items()))
    dn = rep["distinct_n"]
    out.append(f"distinct-1/2/3 over {rep['sample_size']} prompts: {dn['distinct_1']:.3f} / "
               f"{dn['distinct_2']:.3f} / {dn['distinct_3']:.3f}")
    s = rep["similarity"]
    if s.get("pairs"):
        out.append(f"pairwise MinHash similarity over {s['pairs']} pairs: mean {s['mean']:.3f}, p50 {s['p50']:.3f}, "
                   f"p90 {s['p90']:.3f}, max {s['max']:.3f}; pairs >= 0.8: {s['at_or_above_0.8']:.2%}")
    return out
