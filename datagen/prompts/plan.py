"""The prompt plan: which seed, with which axis values, fills each prompt of a job.

Built once at ``prepare`` (before Ray starts), deterministically from the job seed:

1. **Axis quotas.** For each axis, ``count`` slots are dealt its values in shares given by
   the weights (largest-remainder rounding, so a value's count is within one of
   ``count x share``), shuffled by the job seed. Axes are independent.
2. **Seeds.** Seeds are shuffled by the job seed (with no axes, exactly the order and
   the first ``count`` seeds of the original stream). A slot takes the next seed of its
   pool (the seeds matching its ``column`` axes), cycling, and skips a seed already used
   with the same free axis values, so no two slots render alike by construction.
3. **Cleaning.** Each rendered prompt is checked in order: exact duplicate (prompt id),
   contamination, near-duplicate of a prompt kept before it. A dropped prompt is
   replaced by a new slot with the *same* axis values and the pool's next seed, which
   keeps the quotas exact; a slot whose pool runs dry is a shortfall.

The plan keeps only (seed index, axis values) per prompt; the stream renders again
lazily. Planning itself holds the MinHash index of the kept prompts' shingle sets.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from datagen import records
from datagen.config import Prompts
from datagen.errors import ConfigError
from datagen.prompts.clean import Decontaminator, NearDuplicates
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
        self.pools: dict[tuple[str, ...], list[int]] = {}
        for i in order:
            self.pools.setdefault(self._pool_key_of_seed(i), []).append(i)
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

    def _pool_key_of_seed(self, i: int) -> tuple[str, ...]:
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

    def deal(self, count: int) -> list[tuple[str, ...]]:
        dealt = []
        for name in self.axes:
            shares = apportion(count, self.cfg.axes[name].weights())
            column = [v for v, k in shares.items() for _ in range(k)]
            random.Random(f"{self.job_seed}/axes/{name}").shuffle(column)
            dealt.append(column)
        return list(zip(*dealt)) if dealt else [()] * count


def make_plan(template: Template, cfg: Prompts, job_seed: int) -> Plan:
    p = _Planner(template, cfg, job_seed)
    n_seeds = len(template.seeds.rows)
    count = cfg.count if cfg.count is not None else n_seeds
    if cfg.count is not None and not p.free and cfg.count > n_seeds:
        raise ConfigError(
            f"prompts.count: {cfg.count} is more than the {n_seeds} seeds in {template.spec.seeds.path}; "
            "add seeds, add a diversity axis (prompts.axes), or raise teachers[].sampling.n "
            "for more samples per prompt"
        )
    targets = {a: {v: w / sum(ax.weights().values()) for v, w in ax.weights().items()}
               for a, ax in cfg.axes.items()}
    dedupe = cfg.dedupe
    near = NearDuplicates(dedupe) if dedupe is not None and dedupe.near else None
    decon = Decontaminator(cfg.decontaminate) if cfg.decontaminate is not None else None
    queue = deque(p.deal(count))
    kept: list[tuple[int, tuple[str, ...]]] = []
    seen: dict[str, int] = {}  # prompt id -> seed index, for the error naming both seeds
    dropped: Counter = Counter()
    contaminated: Counter = Counter()
    unfilled: Counter = Counter()
    candidates = 0
    ids = template.seeds.ids
    while queue:
        batch = []
        while queue and len(batch) < CHUNK:
            combo = queue.popleft()
            i = p.next_seed(combo)
            if i is None:
                unfilled[combo] += 1
                continue
            what = f"seed {ids[i]!r}" + (f" with {dict(zip(p.axes, combo))}" if combo else "")
            batch.append((i, combo, template.render(p.values(i, combo), what=what)))
        candidates += len(batch)
        texts = [m[-1]["content"] for _, _, m in batch]
        keys = near.keys(texts) if near is not None and batch else None
        for k, (i, combo, messages) in enumerate(batch):
            pid = records.prompt_id(messages)
            reason = None
            if pid in seen:
                if dedupe is None or not dedupe.exact:
                    raise ConfigError(
                        f"{template.spec.seeds.path}: seeds {ids[seen[pid]]!r} and {ids[i]!r} render the same "
                        "prompt (they would be one row id); drop one, set prompts.dedupe, or raise sampling.n"
                    )
                reason = "exact"
            elif decon is not None and (hit := decon.hit(texts[k])) is not None:
                reason = "contaminated"
                contaminated[hit] += 1
            elif near is not None and near.check(texts[k], keys[k]):
                reason = "near"
            if reason is None:
                seen[pid] = i
                kept.append((i, combo))
            else:
                dropped[reason] += 1
                queue.append(combo)  # a replacement with the same axis values keeps the quotas
    plan = Plan(axes=p.axes, slots=kept, targets=targets)
    plan.report = {
        "requested": count, "planned": len(kept), "candidates": candidates,
        "dropped": {"exact": dropped["exact"], "near": dropped["near"],
                    "contaminated": dict(sorted(contaminated.items()))},
        "unfilled": sum(unfilled.values()),
        "bad_seed_rows": list(template.seeds.problems),
        "decontamination_ngram": cfg.decontaminate.ngram if cfg.decontaminate else None,
        "evals_digest": decon.digest if decon else None,
    }
    if cfg.count is not None and len(kept) < cfg.count:
        worst = ", ".join(f"{dict(zip(p.axes, c)) or 'no axes'} x{n}" for c, n in unfilled.most_common(3))
        raise ConfigError(
            f"prompts.count: only {len(kept)} of {cfg.count} prompts could be planned: the seeds ran out "
            f"for {worst} (after dropping {dropped['exact']} exact duplicates, {dropped['near']} "
            f"near-duplicates, {sum(contaminated.values())} contaminated); add seeds or axis values, "
            "or lower prompts.count"
        )
    _check_quotas(plan, cfg.quota_tolerance)
    return plan


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
