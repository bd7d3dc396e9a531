"""The prompt plan: which seed, with which axis values, fills each prompt of a job.

Built once at ``prepare`` (before Ray starts), deterministically from the job seed:

1. **Axis quotas.** For each axis, ``count`` slots are dealt its values in shares given by
   the weights (largest-remainder rounding, so a value's count is within one of
   ``count x share``), spread evenly over the combinations of the other axes' values
   (``deal``), in an order drawn from the job seed.
2. **Seeds.** Seeds are shuffled by the job seed (with no axes, exactly the order and
   the first ``count`` seeds of the original stream). A slot takes the next seed of its
   pool (the seeds matching its ``column`` axes), cycling, and skips a seed already used
   with the same free axis values, so no two slots render alike by construction.
3. **Cleaning.** Before any slot is filled, seeds that are near-duplicates of an earlier
   seed, or that share an n-gram with an eval set, leave every pool (``_screen_seeds``).
   Then each rendered prompt is checked against the prompt ids kept so far: an exact
   duplicate is replaced by a new slot with the *same* axis values and the pool's next
   seed, which keeps the quotas exact; a slot whose pool runs dry is a shortfall.

The plan keeps only (seed index, axis values) per prompt; the stream renders again
lazily. Screening holds the MinHash index of the kept seeds' shingle sets.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from datagen import records
from datagen.config import Prompts
from datagen.errors import ConfigError
from datagen.prompts.clean import Decontaminator, NearDuplicates, compared_text
from datagen.prompts.spec import Template

CHUNK = 2048  # prompts rendered and MinHashed per batch while planning


def apportion(count: int, weights: dict[str, float]) -> dict[str, int]:
    """``count`` split by ``weights``: floor of each share, then the largest remainders
    (ties: the order the values are listed in) get one more."""
    total = sum(weights.values())
    exact = {v: count * w / total for v, w in weights.items()}
    out = {v: int(x) for v, x in exact.items()}
    left = count - sum(out.values())
    order = sorted(weights, key=lambda v: -(exact[v] - out[v]))  # stable: listed order breaks ties
    for v in order[:left]:
        out[v] += 1
    return out


@dataclass
class Plan:
    axes: list[str]
    slots: list[tuple[int, tuple[str, ...]]]  # (seed index, axis values), in stream order
    targets: dict[str, dict[str, float]]  # axis -> value -> requested share
    report: dict[str, Any] = field(default_factory=dict)

    def histogram(self) -> dict[str, dict[str, int]]:
        out = {}
        for i, axis in enumerate(self.axes):
            c = Counter(combo[i] for _, combo in self.slots)
            out[axis] = {v: c.get(v, 0) for v in self.targets[axis]}
        return out


class _Planner:
    def __init__(self, template: Template, cfg: Prompts, job_seed: int):
        self.t, self.cfg, self.job_seed = template, cfg, job_seed
        seeds = template.seeds
        self.axes = list(cfg.axes)
        self.bound = [i for i, a in enumerate(self.axes) if cfg.axes[a].column]
        self.free = [i for i, a in enumerate(self.axes) if not cfg.axes[a].column]
        self._check_axes()
        order = list(range(len(seeds.rows)))
        random.Random(job_seed).shuffle(order)  # the original stream's order: ids stay put
        self.rank = {i: r for r, i in enumerate(order)}
        allowed = [set(cfg.axes[self.axes[k]].weights()) for k in self.bound]
        self.pools: dict[tuple[str, ...], list[int]] = {}
        for i in order:
            key = self.key_of_seed(i)
            if all(v in ok for v, ok in zip(key, allowed)):  # seeds outside every listed value: never drawn
                self.pools.setdefault(key, []).append(i)
        self.cursor: Counter = Counter()
        self.used: set[tuple[int, tuple[str, ...]]] = set()

    def _check_axes(self) -> None:
        rows = self.t.seeds.rows
        for name, axis in self.cfg.axes.items():
            if axis.column:
                have = {str(r.get(axis.column)) for r in rows}
                empty = [v for v in axis.weights() if v not in have]
                if empty:
                    raise ConfigError(f"prompts.axes.{name}: no seed has {axis.column} = {empty[0]!r} "
                                      f"(seen: {', '.join(sorted(have)[:8])})")
                continue
            if name not in self.t.variables:
                raise ConfigError(f"prompts.axes.{name}: the template {self.t.path} never uses "
                                  f"{{{{ {name} }}}}, so this axis would change no prompt")
            if any(name in r for r in rows):
                raise ConfigError(f"prompts.axes.{name}: the seeds have a column {name!r} too; set "
                                  f"`column: {name}` to draw seeds by it, or rename the axis")

    def key_of_seed(self, i: int) -> tuple[str, ...]:
        row = self.t.seeds.rows[i]
        return tuple(str(row.get(self.cfg.axes[self.axes[k]].column)) for k in self.bound)

    def next_seed(self, combo: tuple[str, ...]) -> int | None:
        key = tuple(combo[k] for k in self.bound)
        pool = self.pools.get(key, [])
        free = tuple(combo[k] for k in self.free)
        for _ in range(len(pool)):
            i = pool[self.cursor[key] % len(pool)]
            self.cursor[key] += 1
            if (i, free) not in self.used:
                self.used.add((i, free))
                return i
        return None

    def values(self, i: int, combo: tuple[str, ...]) -> dict[str, Any]:
        return {**self.t.seeds.rows[i], **dict(zip(self.axes, combo))}

    def what(self, i: int, combo: tuple[str, ...]) -> str:
        return f"seed {self.t.seeds.ids[i]!r}" + (f" with {dict(zip(self.axes, combo))}" if combo else "")

    def deal(self, count: int) -> list[tuple[str, ...]]:
        """Axis values for ``count`` slots: exact shares per axis, and balanced jointly.

        Each axis's values are laid out as an evenly spaced sequence (``_spread``) over the
        slots sorted by the values they already hold, so every group of slots sharing
        the earlier axes' values gets its fair share of this axis too (within one). Dealt
        independently instead, some value combinations would draw far more slots than
        their share, and more than their pool of seeds holds."""
        rng = random.Random(f"{self.job_seed}/axes")
        held: list[tuple[str, ...]] = [()] * count
        order = list(range(count))
        for name in self.axes:
            seq = _spread(apportion(count, self.cfg.axes[name].weights()), rng)
            rank = {c: rng.random() for c in sorted(set(held))}  # groups in random order
            rng.shuffle(order)
            order.sort(key=lambda s: rank[held[s]])  # stable: random order within a group
            for pos, s in enumerate(order):
                held[s] = held[s] + (seq[pos],)
        rng.shuffle(held)
        return held


def _spread(counts: dict[str, int], rng: random.Random) -> list[str]:
    """Each value's ``n`` copies at evenly spaced positions (random phase), merged: any
    run of the result holds each value in proportion, within one."""
    marks = []
    for v, n in counts.items():
        phase = rng.random()
        marks += [((m + phase) / n, v) for m in range(n)]
    marks.sort()
    return [v for _, v in marks]


def make_plan(template: Template, cfg: Prompts, job_seed: int) -> Plan:
    p = _Planner(template, cfg, job_seed)
    n_seeds = len(template.seeds.rows)
    if cfg.count is not None and not p.free and cfg.count > n_seeds:
        raise ConfigError(
            f"prompts.count: {cfg.count} is more than the {n_seeds} seeds in {template.spec.seeds.path}; "
            "add seeds, add a diversity axis (prompts.axes), or raise teachers[].sampling.n "
            "for more samples per prompt"
        )
    screened = _screen_seeds(p, cfg)
    count = cfg.count if cfg.count is not None else sum(len(pool) for pool in p.pools.values())
    targets = {a: {v: w / sum(ax.weights().values()) for v, w in ax.weights().items()}
               for a, ax in cfg.axes.items()}
    dedupe = cfg.dedupe
    queue = deque(p.deal(count))
    kept: list[tuple[int, tuple[str, ...]]] = []
    seen: dict[str, int] = {}  # prompt id -> seed index, for the error naming both seeds
    exact = 0
    unfilled: Counter = Counter()
    candidates = 0
    ids = template.seeds.ids
    while queue:
        combo = queue.popleft()
        i = p.next_seed(combo)
        if i is None:
            unfilled[combo] += 1
            continue
        candidates += 1
        pid = records.prompt_id(template.render(p.values(i, combo), what=p.what(i, combo)))
        if pid not in seen:
            seen[pid] = i
            kept.append((i, combo))
            continue
        if dedupe is None or not dedupe.exact:
            raise ConfigError(
                f"{template.spec.seeds.path}: seeds {ids[seen[pid]]!r} and {ids[i]!r} render the same "
                "prompt (they would be one row id); drop one, set prompts.dedupe, or raise sampling.n"
            )
        exact += 1
        queue.append(combo)  # a replacement with the same axis values keeps the quotas
    plan = Plan(axes=p.axes, slots=kept, targets=targets)
    plan.report = {
        "requested": count, "planned": len(kept), "candidates": candidates,
        "seeds": n_seeds, **screened, "exact_duplicate_prompts": exact,
        "unfilled": sum(unfilled.values()),
        "bad_seed_rows": list(template.seeds.problems),
    }
    if cfg.count is not None and len(kept) < cfg.count:
        worst = ", ".join(f"{dict(zip(p.axes, c)) or 'no axes'} x{n}" for c, n in unfilled.most_common(3))
        raise ConfigError(
            f"prompts.count: only {len(kept)} of {cfg.count} prompts could be planned: the seeds ran out "
            f"for {worst} (after dropping {screened['near_duplicate_seeds']} near-duplicate and "
            f"{sum(screened['contaminated_seeds'].values())} contaminated seeds, {exact} exact duplicate "
            "prompts); add seeds or axis values, or lower prompts.count"
        )
    _check_quotas(plan, cfg.quota_tolerance)
    return plan


def _screen_seeds(p: _Planner, cfg: Prompts) -> dict[str, Any]:
    """Drop near-duplicate and contaminated seeds from every pool, before any slot is filled.

    Both are properties of a seed's content, not of the axis values dealt to it (the same
    question for two personas is variety, not duplication). Each seed is rendered once
    with the first value of every free axis, so only seed content differs between the
    texts compared; in shuffled order, the earlier of two near-duplicates stays."""
    near = NearDuplicates(cfg.dedupe) if cfg.dedupe is not None and cfg.dedupe.near else None
    decon = Decontaminator(cfg.decontaminate) if cfg.decontaminate is not None else None
    out: dict[str, Any] = {"near_duplicate_seeds": 0, "contaminated_seeds": {},
                           "decontamination_ngram": cfg.decontaminate.ngram if decon else None,
                           "evals_digest": decon.digest if decon else None}
    if near is None and decon is None:
        return out
    first = {k: next(iter(cfg.axes[p.axes[k]].weights())) for k in p.free}
    dropped: set[int] = set()
    contaminated: Counter = Counter()
    order = [i for pool in p.pools.values() for i in pool]
    order.sort(key=p.rank.__getitem__)
    for start in range(0, len(order), CHUNK):
        batch = order[start:start + CHUNK]
        texts = []
        for i in batch:
            combo = tuple(first[k] if k in first else p.key_of_seed(i)[p.bound.index(k)]
                          for k in range(len(p.axes)))
            texts.append(compared_text(p.t.render(p.values(i, combo), what=p.what(i, combo))))
        hits = [decon.hit(t) for t in texts] if decon is not None else [None] * len(texts)
        near_dup = near.check_many(texts, skip=[h is not None for h in hits]) if near is not None else hits
        for k, i in enumerate(batch):
            if hits[k] is not None:  # contaminated: out of every pool, and not indexed
                contaminated[hits[k]] += 1
                dropped.add(i)
            elif near_dup[k]:
                out["near_duplicate_seeds"] += 1
                dropped.add(i)
    for key, pool in p.pools.items():
        p.pools[key] = [i for i in pool if i not in dropped]
    out["contaminated_seeds"] = dict(sorted(contaminated.items()))
    return out


def _check_quotas(plan: Plan, tolerance: float) -> None:
    total = max(len(plan.slots), 1)
    for axis, hist in plan.histogram().items():
        for value, n in hist.items():
            want = plan.targets[axis][value]
            if abs(n / total - want) > tolerance + 1.0 / total:
                raise ConfigError(
                    f"prompts.axes.{axis}: {value!r} got {n / total:.1%} of the prompts, {want:.1%} requested "
                    f"(prompts.quota_tolerance {tolerance:g}); the seeds for it ran out: add seeds or lower "
                    "prompts.count"
                )
