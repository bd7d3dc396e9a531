"""The rows of an output, counted for the report (``collect.py`` adds the side files).

One pass per stream over the committed shards, row group by row group, reading only the
columns a figure needs (``usage``, ``teacher``, ``verdicts``, ``license``, the sampled
token's log-prob codes): memory is flat in dataset size, and what is kept are counters
(token-length histograms by exact length, verdict counts, license combinations). The
top-k log-probs are read only for the first ``LOGPROB_SAMPLE_ROWS`` accepted rows that
have them (for the entropy figure); the sample rows' text is read afterwards, from the
few row groups that hold them. The side files a run writes (``metrics.jsonl``,
``prompts_report.json``, ``dedupe/report.json``) are read whole: they are small.

Every figure here is a count over the committed rows (what the manifest lists), except
where a key says it was sampled (``sampled``, ``of``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datagen import records

LOGPROB_SAMPLE_ROWS = 20_000  # accepted rows whose top-k go into the entropy figure
LOGPROB_CLIP = 20 * records.LOGPROB_SCALE  # the log-prob histogram stops at -20 nats
SAMPLES = {"accepted": 2, "rejected": 2, "failed": 2}  # sample rows per teacher / reason / error code
SAMPLE_REASONS = 8  # reasons (or error codes) per stream that get sample rows
SAMPLE_CHARS = 1500  # a sample's prompt and answer are cut here
SCORE_SAMPLE = 50_000  # filter scores kept per filter for the score histogram


class _Stream:
    """Counters of one stream, fed a row group at a time."""

    def __init__(self, name: str, want_logprobs: bool):
        self.name = name
        self.rows = 0
        self.lengths = np.zeros(1, dtype=np.int64)  # completion tokens -> rows
        self.by_teacher: dict[str, Counter] = {}
        self.verdicts: Counter = Counter()  # (filter, keep, reason) -> verdicts
        self.scores: dict[str, list[np.ndarray]] = {}
        self.licenses: Counter = Counter()  # (teacher, seed, template, logprobs) -> rows
        self.lp_hist = np.zeros(LOGPROB_CLIP + 1, dtype=np.int64)
        self.lp_sum = 0
        self.lp_rows = 0
        self.entropy: list[np.ndarray] = []
        self.topk_mass: list[np.ndarray] = []
        self.entropy_rows = 0
        self.want_logprobs = want_logprobs
        self.picked: dict[str, list[tuple[int, int, int]]] = {}  # reason -> (file, row group, row)

    def columns(self) -> list[str]:
        cols = ["usage", "teacher", "license", "verdicts", "token_logprobs_q"]
        if self.name == "failed":
            cols.append("error")
        if self.want_logprobs and self.entropy_rows < LOGPROB_SAMPLE_ROWS:
            cols.append("top_logprobs_q")
        return cols

    def add(self, t: pa.Table, where: tuple[int, int]) -> None:
        n = t.num_rows
        self.rows += n
        names = pc.struct_field(t["teacher"], "name").fill_null("?")
        usage = t["usage"]
        pt = pc.struct_field(usage, "prompt_tokens")
        ct = pc.struct_field(usage, "completion_tokens")
        cost = pc.struct_field(usage, "cost_usd")
        agg = pa.table({"name": names, "pt": pt, "ct": ct, "cost": cost}).group_by("name").aggregate(
            [("pt", "sum"), ("ct", "sum"), ("cost", "sum"), ("cost", "count"), ("name", "count")])
        for r in agg.to_pylist():
            c = self.by_teacher.setdefault(r["name"], Counter())
            c.update({"rows": r["name_count"], "prompt_tokens": r["pt_sum"] or 0,
                      "completion_tokens": r["ct_sum"] or 0, "priced_rows": r["cost_count"]})
            c["cost_usd"] += r["cost_sum"] or 0.0
        lens = ct.drop_null().to_numpy(zero_copy_only=False).astype(np.int64)
        if len(lens):
            counts = np.bincount(np.maximum(lens, 0))
            if len(counts) > len(self.lengths):
                self.lengths = np.pad(self.lengths, (0, len(counts) - len(self.lengths)))
            self.lengths[:len(counts)] += counts
        lic = t["license"]
        lic_t = pa.table({k: pc.struct_field(lic, k) for k in ("teacher", "seed", "template", "logprobs")})
        for r in lic_t.group_by(["teacher", "seed", "template", "logprobs"]).aggregate([([], "count_all")]).to_pylist():
            self.licenses[(r["teacher"], r["seed"], r["template"], r["logprobs"])] += r["count_all"]
        first_drop = self._verdicts(t["verdicts"], n)
        self._logprobs(t)
        self._pick(t, names, first_drop, where)

    def _verdicts(self, col: Any, n: int) -> list[str | None]:
        flat = pc.list_flatten(col)
        if len(flat) == 0:
            return [None] * n
        parents = pc.list_parent_indices(col).to_numpy()
        v = pa.table({"filter": pc.struct_field(flat, "filter"), "keep": pc.struct_field(flat, "keep"),
                      "reason": pc.struct_field(flat, "reason")})
        for r in v.group_by(["filter", "keep", "reason"]).aggregate([([], "count_all")]).to_pylist():
            self.verdicts[(r["filter"], r["keep"], r["reason"])] += r["count_all"]
        scores = pc.struct_field(flat, "score")
        filters = pc.struct_field(flat, "filter")
        if scores.null_count < len(scores):
            for name in pc.unique(pc.filter(filters, pc.is_valid(scores))).to_pylist():
                kept = self.scores.setdefault(name, [])
                if sum(len(a) for a in kept) < SCORE_SAMPLE:
                    sel = pc.and_(pc.equal(filters, name), pc.is_valid(scores))
                    kept.append(pc.filter(scores, sel).to_numpy(zero_copy_only=False))
        # a row's reason is its first drop (records.decide), found without a dict per row
        keep = pc.struct_field(flat, "keep").fill_null(True).to_numpy(zero_copy_only=False)
        drops = np.flatnonzero(~keep)
        out: list[str | None] = [None] * n
        if len(drops):
            rows, first = np.unique(parents[drops], return_index=True)
            reasons = pc.struct_field(flat, "reason").take(pa.array(drops[first])).to_pylist()
            for row, why in zip(rows.tolist(), reasons):
                out[row] = why
        return out

    def _logprobs(self, t: pa.Table) -> None:
        col = t["token_logprobs_q"]
        with_lp = len(col) - col.null_count
        if with_lp:
            codes = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int64)
            self.lp_rows += with_lp
            self.lp_sum += int(codes.sum())
            self.lp_hist += np.bincount(np.minimum(codes, LOGPROB_CLIP), minlength=LOGPROB_CLIP + 1)
        if "top_logprobs_q" not in t.column_names:
            return
        top = t["top_logprobs_q"].combine_chunks()
        top = top.filter(pc.is_valid(top)).slice(0, LOGPROB_SAMPLE_ROWS - self.entropy_rows)
        if len(top) == 0:
            return
        self.entropy_rows += len(top)
        positions = pc.list_flatten(top)
        widths = pc.list_value_length(positions).to_numpy(zero_copy_only=False)
        deltas = pc.list_flatten(positions).to_numpy(zero_copy_only=False).astype(np.int64)
        if len(widths) == 0 or (widths != widths[0]).any() or widths[0] == 0:
            return  # ragged top-k (a backend that sent fewer at some positions): left out
        lp = -np.cumsum(deltas.reshape(-1, int(widths[0])), axis=1) / records.LOGPROB_SCALE
        p = np.exp(lp)
        self.entropy.append(-(p * lp).sum(axis=1))
        self.topk_mass.append(p.sum(axis=1))

    def _pick(self, t: pa.Table, names: Any, first_drop: list[str | None], where: tuple[int, int]) -> None:
        if self.name == "accepted":
            keys = names.to_pylist()
        elif self.name == "rejected":
            keys = [r or "rejected.unknown" for r in first_drop]
        else:
            keys = [records.reason({"error": e}, "failed") for e in t["error"].to_pylist()]
        for i, key in enumerate(keys):
            got = self.picked.get(key)
            if got is None:
                if len(self.picked) >= SAMPLE_REASONS:
                    continue
                got = self.picked[key] = []
            if len(got) < SAMPLES[self.name]:
                got.append((*where, i))

    def summary(self) -> dict[str, Any]:
        lengths = self.lengths
        total = int(lengths.sum())
        out: dict[str, Any] = {"rows": self.rows, "length_hist": lengths.tolist() if total else [],
                               "length": _quantiles(lengths) if total else None}
        return out


def _quantiles(counts: np.ndarray) -> dict[str, float]:
    """p50/p90/p99/max/mean of values given as counts per value (index = value)."""
    cum = np.cumsum(counts)
    total = cum[-1]
    q = {f"p{int(p * 100)}": int(np.searchsorted(cum, p * total)) for p in (0.5, 0.9, 0.99)}
    q["max"] = int(np.flatnonzero(counts)[-1])
    q["mean"] = round(float((np.arange(len(counts)) * counts).sum() / total), 1)
    return q


def _scan(store: Any, name: str, stream: _Stream) -> list[str]:
    files = store.manifest.files(name)
    fs = store.manifest.filesystem
    for fi, path in enumerate(files):
        pf = pq.ParquetFile(path, filesystem=fs)
        for rg in range(pf.num_row_groups):
            stream.add(pf.read_row_group(rg, columns=stream.columns()), (fi, rg))
    return [str(f) for f in files]


def _sample_rows(store: Any, name: str, files: list[str], picked: dict[str, list[tuple[int, int, int]]]) -> list[dict]:
    """The picked rows' text, read from the row groups that hold them."""
    by_group: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for key, spots in picked.items():
        for fi, rg, i in spots:
            by_group.setdefault((fi, rg), []).append((i, key))
    cols = ["row_id", "messages", "response", "finish_reason", "teacher", "verdicts", "error", "usage"]
    out = []
    for (fi, rg), wanted in sorted(by_group.items()):
        t = pq.ParquetFile(files[fi], filesystem=store.manifest.filesystem).read_row_group(rg, columns=cols)
        for (i, key), row in zip(wanted, t.take(pa.array([i for i, _ in wanted])).to_pylist()):
            msgs = row["messages"] or []
            system = next((m["content"] for m in msgs if m["role"] == "system"), None)
            out.append({
                "stream": name, "key": key, "row_id": row["row_id"], "teacher": (row["teacher"] or {}).get("name"),
                "system": _cut(system), "prompt": _cut(msgs[-1]["content"] if msgs else ""),
                "response": _cut(row["response"]), "finish_reason": row["finish_reason"], "error": _cut(row["error"]),
                "completion_tokens": (row["usage"] or {}).get("completion_tokens"),
                "verdicts": [{k: v.get(k) for k in ("filter", "keep", "reason", "score")} for v in row["verdicts"] or []],
            })
    order = {k: n for n, k in enumerate(picked)}
    return sorted(out, key=lambda r: order[r["key"]])


def _cut(text: str | None) -> str | None:
    if text is None or len(text) <= SAMPLE_CHARS:
        return text
    return text[:SAMPLE_CHARS] + f"… [{len(text) - SAMPLE_CHARS} more characters]"


def scan(store: Any) -> dict[str, Any]:
    """Every committed row of ``store``, counted; a few rows per stream and reason sampled."""
    streams, samples = {}, []
    counts: dict[str, _Stream] = {}
    for name in records.STREAMS:
        s = counts[name] = _Stream(name, want_logprobs=name == "accepted")
        files = _scan(store, name, s)
        streams[name] = s.summary()
        samples += _sample_rows(store, name, files, s.picked)
    teachers: dict[str, dict[str, Any]] = {}
    for name, s in counts.items():
        for teacher, c in s.by_teacher.items():
            t = teachers.setdefault(teacher, Counter())
            t.update({k: v for k, v in c.items() if k != "cost_usd"})
            t["cost_usd"] += c["cost_usd"]
            t[name] += c["rows"]
    filters: dict[str, dict[str, Any]] = {}
    for name in ("accepted", "rejected"):
        for (f, keep, why), n in counts[name].verdicts.items():
            entry = filters.setdefault(f or "?", {"ran": 0, "dropped": 0, "reasons": Counter()})
            entry["ran"] += n
            if not keep:
                entry["dropped"] += n
                entry["reasons"][why or "?"] += n
    scores = {}
    for name in ("accepted", "rejected"):
        for f, arrays in counts[name].scores.items():
            scores.setdefault(f, []).extend(arrays)
    acc = counts["accepted"]
    ent = np.concatenate(acc.entropy) if acc.entropy else None
    mass = np.concatenate(acc.topk_mass) if acc.topk_mass else None
    tokens_lp = int(acc.lp_hist.sum())
    return {
        "streams": streams,
        "teachers": {k: dict(v) for k, v in sorted(teachers.items())},
        "filters": {f: {**e, "reasons": dict(e["reasons"].most_common())} for f, e in sorted(filters.items())},
        "scores": {f: _score_summary(np.concatenate(a)[:SCORE_SAMPLE]) for f, a in sorted(scores.items()) if a},
        "licenses": acc.licenses,
        "logprobs": None if not tokens_lp else {
            "rows": acc.lp_rows, "of": acc.rows, "tokens": tokens_lp,
            "mean": round(-acc.lp_sum / tokens_lp / records.LOGPROB_SCALE, 4),
            "hist": _coarse(acc.lp_hist, records.LOGPROB_SCALE // 2),  # half-nat bins, 0 to -20
            "entropy": None if ent is None or not len(ent) else {
                "rows": acc.entropy_rows, "positions": int(len(ent)), "mean": round(float(ent.mean()), 4),
                "p50": round(float(np.quantile(ent, 0.5)), 4), "p90": round(float(np.quantile(ent, 0.9)), 4),
                "topk_mass_mean": round(float(mass.mean()), 4),
                "hist": np.histogram(ent, bins=20, range=(0.0, max(float(ent.max()), 1e-6)))[0].tolist(),
                "hist_max": round(max(float(ent.max()), 1e-6), 4)},
        },
        "samples": samples,
    }


def _coarse(hist: np.ndarray, step: int) -> list[int]:
    pad = (-len(hist)) % step
    return np.pad(hist, (0, pad)).reshape(-1, step).sum(axis=1).tolist()


def _score_summary(a: np.ndarray) -> dict[str, Any]:
    a = a[np.isfinite(a)]
    if not len(a):
        return {"n": 0}
    lo, hi = float(a.min()), float(a.max())
    hist, edges = np.histogram(a, bins=20, range=(lo, hi if hi > lo else lo + 1))
    return {"n": int(len(a)), "mean": round(float(a.mean()), 4), "min": round(lo, 4), "max": round(hi, 4),
            "hist": hist.tolist(), "edges": [round(float(e), 4) for e in edges]}
