"""The report's figures as inline SVG, drawn with matplotlib's object API (no pyplot, so
no global figure state and no GUI backend), text kept as text (``svg.fonttype: none``:
smaller, selectable, and the page's own font). Each function takes the plain numbers of
one section (``collect.py``) and returns an ``<svg>`` string, or None when there is
nothing to draw. The numbers themselves are printed beside each figure by the page.

matplotlib is imported on the first figure: ``import datagen.report`` stays cheap.
"""

from __future__ import annotations

import io
import re
from typing import Any

COLORS = {"accepted": "#2f7d32", "rejected": "#c0392b", "failed": "#7f8c8d"}
PALETTE = ["#1f6fb2", "#e67e22", "#2f7d32", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d"]
WIDTH = 6.4  # inches; the page scales the SVG to its column
# parse_math off: a reason or an axis value with two "$" in it is text, not TeX
RC = {"font.size": 8, "axes.titlesize": 9, "text.parse_math": False}


def _figure(height: float = 2.6, ncols: int = 1) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, axes


def _svg(fig: Any, name: str) -> str:
    """The figure as an ``<svg>`` element: no XML prolog, doctype or RDF metadata, ids salted with
    ``name`` so that two figures on one page never share a clip-path id."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name, "font.size": 8}):
        FigureCanvasSVG(fig).print_svg(buf, metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg[svg.index("<svg"):], count=1, flags=re.S)
    return re.sub(r'<svg ([^>]*?)width="[^"]*" height="[^"]*"', r'<svg \1', svg, count=1)


def _draw(name: str, height: float = 2.6, ncols: int = 1):  # noqa: ANN202 - a decorator factory
    def wrap(fn):  # noqa: ANN001, ANN202
        def run(*args: Any, height: float = height, ncols: int = ncols, **kw: Any) -> str | None:
            import matplotlib

            with matplotlib.rc_context(RC):
                fig, axes = _figure(height, ncols)
                if fn(axes, *args, **kw) is False:
                    return None
                return _svg(fig, name)
        return run
    return wrap


@_draw("throughput", ncols=2, height=2.4)
def throughput(axes: Any, metrics: dict[str, Any]) -> bool:
    if len(metrics["t"]) < 2:
        return False
    rates, depths = axes
    for (label, ys), color in zip(metrics["rates"].items(), PALETTE):
        rates.plot(metrics["t"], ys, label=label, color=color, linewidth=1)
    rates.set(title="rows/s by stage", xlabel="seconds since start")
    rates.legend(frameon=False, fontsize=7)
    for (label, ys), color in zip(metrics["depths"].items(), PALETTE):
        if label != "store pending rows":
            depths.step(metrics["t"], ys, label=label, color=color, linewidth=1, where="post")
    depths.set(title="queue depth (batches)", xlabel="seconds since start")
    depths.legend(frameon=False, fontsize=7)
    return True


@_draw("reasons", height=2.4)
def reasons(axes: Any, by_stream: dict[str, dict[str, int]]) -> bool:
    bars = [(f"{why}", n, COLORS[s]) for s in ("rejected", "failed") for why, n in list(by_stream[s].items())[:12]]
    if not bars:
        return False
    ax = axes[0]
    ax.barh(range(len(bars)), [n for _, n, _ in bars], color=[c for _, _, c in bars])
    ax.set_yticks(range(len(bars)), [w for w, _, _ in bars])
    ax.invert_yaxis()
    ax.set(title="rows by reason (red: rejected by a filter, grey: failed at the teacher)", xlabel="rows")
    ax.grid(axis="x", color="#e5e5e5", linewidth=0.6)
    return True


@_draw("lengths")
def lengths(axes: Any, streams: dict[str, dict[str, Any]]) -> bool:
    import numpy as np

    drawn = False
    ax = axes[0]
    top = max((len(streams[s]["length_hist"]) for s in ("accepted", "rejected")), default=0)
    if top == 0:
        return False
    edges = np.unique(np.linspace(0, top, min(top, 50) + 1).astype(int))
    for s in ("accepted", "rejected"):
        hist = np.asarray(streams[s]["length_hist"], dtype=float)
        if not hist.sum():
            continue
        binned = np.add.reduceat(np.pad(hist, (0, top - len(hist))), edges[:-1]) if len(edges) > 1 else hist
        ax.stairs(binned / hist.sum(), edges, label=f"{s} ({int(hist.sum())} rows)", color=COLORS[s], linewidth=1.2)
        drawn = True
    ax.set(title="response length (completion tokens), share of each stream's rows", xlabel="tokens")
    ax.legend(frameon=False, fontsize=7)
    return drawn


@_draw("logprobs", ncols=2, height=2.3)
def logprobs(axes: Any, lp: dict[str, Any]) -> bool:
    import numpy as np

    left, right = axes
    hist = np.asarray(lp["hist"], dtype=float)
    left.stairs(hist / hist.sum(), np.arange(len(hist) + 1) / 2.0, color=PALETTE[0], fill=True, alpha=0.7)
    left.set(title="sampled token's log-prob (share of tokens)", xlabel="-log p (nats; last bin: 20 and over)")
    ent = lp.get("entropy")
    if ent:
        h = np.asarray(ent["hist"], dtype=float)
        right.stairs(h / h.sum(), np.linspace(0, ent["hist_max"], len(h) + 1), color=PALETTE[1], fill=True, alpha=0.7)
        right.set(title="top-k entropy per position", xlabel="nats (over the stored top-k)")
    else:
        right.set_axis_off()
    return True


@_draw("axes", height=2.4)
def axis_shares(axes: Any, axes_report: dict[str, dict[str, dict[str, float]]]) -> bool:
    ax = axes[0]
    labels, shares, targets = [], [], []
    for axis, hist in list(axes_report.items())[:4]:
        for value, h in list(hist.items())[:12]:
            labels.append(f"{axis}={value}"[:32])
            shares.append(h["share"])
            targets.append(h["target"])
    if not labels:
        return False
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], shares, width=0.4, label="share", color=PALETTE[0])
    ax.bar([i + 0.2 for i in x], targets, width=0.4, label="quota", color="#bbbbbb")
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
    ax.set(title="diversity axes: share of prompts vs quota")
    ax.legend(frameon=False, fontsize=7)
    return True


@_draw("similarity", height=2.2)
def similarity(axes: Any, sim: dict[str, Any]) -> bool:
    hist = sim.get("histogram")
    if not hist:
        return False
    ax = axes[0]
    ax.bar(range(len(hist)), list(hist.values()), color=PALETTE[0])
    ax.set_xticks(range(len(hist)), list(hist), rotation=30, ha="right")
    ax.set(title=f"pairwise MinHash similarity of prompts ({sim['pairs']} pairs)", ylabel="pairs")
    return True


@_draw("clusters", height=2.2)
def cluster_sizes(axes: Any, sizes: dict[str, int]) -> bool:
    if not sizes:
        return False
    ax = axes[0]
    ax.bar(range(len(sizes)), list(sizes.values()), color=PALETTE[3])
    ax.set_xticks(range(len(sizes)), list(sizes))
    ax.set_yscale("log")
    ax.set(title="dedupe clusters by size (log scale)", xlabel="rows in the cluster", ylabel="clusters")
    return True


@_draw("scores", height=2.2)
def scores(axes: Any, by_filter: dict[str, dict[str, Any]]) -> bool:
    ax = axes[0]
    drawn = False
    for (f, s), color in zip(list(by_filter.items())[:4], PALETTE):
        if s.get("n"):
            ax.stairs([n / s["n"] for n in s["hist"]], s["edges"], label=f"{f} ({s['n']})", color=color)
            drawn = True
    ax.set(title="filter scores (share of scored rows)")
    ax.legend(frameon=False, fontsize=7)
    return drawn


@_draw("licenses", height=1.8)
def license_classes(axes: Any, by_class: dict[str, int]) -> bool:
    if not sum(by_class.values()):
        return False
    ax = axes[0]
    ax.barh(list(by_class), list(by_class.values()), color=[PALETTE[2], PALETTE[1], PALETTE[4]])
    ax.invert_yaxis()
    ax.set(title="accepted rows by license class", xlabel="rows")
    return True


@_draw("train", height=2.4)
def train(axes: Any, log: dict[str, Any]) -> bool:
    ax = axes[0]
    for key, color in zip(("loss", "ce", "kd"), PALETTE):
        ys = log[key]
        if any(y is not None for y in ys):
            ax.plot(log["step"], [float("nan") if y is None else y for y in ys], label=key, color=color, linewidth=1)
    ax.set(title="training loss", xlabel="step")
    ax.legend(frameon=False, fontsize=7)
    return True


def routing(rep: dict[str, Any]) -> str | None:
    """Quality against the share sent to the teacher (every router, the random router, the
    oracle, all-student and all-teacher lines) and, with a cost model, against the
    cascade's USD per 1,000 queries (the oracle has no cost per point: not drawn there)."""
    return _routing(rep, ncols=2 if rep.get("cost") else 1, height=2.8)


@_draw("routing")
def _routing(axes: Any, rep: dict[str, Any]) -> bool:
    weak, strong = rep["all_student"], rep["all_teacher"]
    curves = {name: r["curve"] for name, r in rep["routers"].items() if r.get("curve")}
    if not curves or weak is None or strong is None:
        return False
    share = axes[0]
    for (name, c), color in zip(curves.items(), PALETTE):
        chosen = name == rep.get("chosen")
        share.plot(c["share"], c["quality"], color=color, linewidth=1.6 if chosen else 1,
                   label=name + (" (router.json)" if chosen else ""))
        op = rep["routers"][name]
        if chosen and op.get("test", {}).get("teacher_share"):
            share.plot([op["test"]["teacher_share"]["value"]], [op["test"]["quality"]["value"]], "o", color=color,
                       markersize=5, label="operating point (test)")
    share.plot([0, 1], [weak, strong], color="#999999", linestyle="--", linewidth=1, label="random")
    oracle = (rep.get("oracle") or {}).get("curve")
    if oracle:
        share.plot(oracle["share"], oracle["quality"], color="#222222", linestyle=":", linewidth=1, label="oracle")
    for y, label in ((weak, "all-student"), (strong, "all-teacher")):
        share.axhline(y, color="#bbbbbb", linewidth=0.8)
        share.annotate(label, (1.0, y), fontsize=7, color="#666666", ha="right", va="bottom")
    share.set(title="quality vs teacher share (test split)", xlabel="share of traffic sent to the teacher",
              ylabel="mean quality", xlim=(0, 1))
    share.legend(frameon=False, fontsize=7)
    if len(axes) > 1:
        cost, c1k = axes[1], rep["cost"]
        for (name, c), color in zip(curves.items(), PALETTE):
            if c.get("cost"):
                cost.plot(c["cost"], c["quality"], color=color, linewidth=1.6 if name == rep.get("chosen") else 1,
                          label=name)
        cascade_all = c1k["all_student"] + c1k["all_teacher"]  # the cascade sending everything on
        cost.plot([c1k["all_student"], cascade_all], [weak, strong], color="#999999", linestyle="--", linewidth=1,
                  label="random")
        cost.plot([c1k["all_student"]], [weak], "s", color="#666666", markersize=4, label="all-student")
        cost.plot([c1k["all_teacher"]], [strong], "^", color="#222222", markersize=5, label="all-teacher (no student)")
        cost.set(title="quality vs cost (the student always runs)", xlabel="USD per 1,000 queries",
                 ylabel="mean quality")
        cost.legend(frameon=False, fontsize=7)
    return True
