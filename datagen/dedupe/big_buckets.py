"""Exact clusters inside a big LSH bucket, without verifying every pair in it.

Every pair of documents in a bucket is a candidate. A bucket of templated answers can hold
thousands of documents, so ``minhash.find_clusters`` verifies a big bucket here instead of
pair by pair. The result is exact: afterwards, any two members whose verified similarity
is at or above the threshold are in the same cluster, just as if every pair had been
verified. Two things make that cheaper than all pairs:

* A pair already in one cluster (joined in this bucket, in another band, or as exact
  duplicates) is not verified again. Clusters are what is kept, not edges.
* The distance behind the check (Jaccard distance ``1 - J`` of the shingle-hash sets, or
  for the signature estimate the share of differing signature entries) is a metric. Each
  cluster seen in the bucket is kept as balls: a centre and its members, each with its
  distance to the centre. A new document ``y`` is measured against the centre ``c`` first;
  a member ``x`` with ``|d(c, x) - d(c, y)| > radius`` cannot be within ``radius`` of
  ``y`` (triangle inequality), so it is skipped, and only the others are verified. The
  skip keeps a margin of ``1e-9`` over the radius, far above float rounding, so it never
  skips a pair the check would accept.

Cost: one check per ball of each cluster that ``y`` is not in yet, plus the members that
the triangle inequality cannot rule out, plus at most one check per member to place it in
a ball (only when another cluster needs it). Templated near-copies form one cluster with
one ball: about one check per document per bucket. Where it costs more than the shortcut it
replaces (a few members per cluster): a document outside a cluster whose members spread
over a range of distances from the centre is checked against each member in the window,
and a bucket of many mutually *dissimilar* documents is one ball per document, so
quadratic in the bucket (every pair there is a candidate that must be shown dissimilar;
centres are not pruned against each other). A pair checked in one big bucket may be
checked again in another band's.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MARGIN = 1e-9  # skip only pairs provably farther than radius + MARGIN


@dataclass
class _Ball:
    centre: int
    placed: list[tuple[float, int]] = field(default_factory=list)  # (distance to centre, member), sorted


@dataclass
class _Group:
    """The bucket's members in one cluster: balls, and members not yet placed in one."""
    balls: list[_Ball]
    unplaced: list[int] = field(default_factory=list)

    def any_member(self) -> int:
        return self.balls[0].centre


def cluster_bucket(members: Sequence[int], *, radius: float, root: Callable[[int], int],
                   check: Callable[[int, int], tuple[bool, float]]) -> None:
    """Verify the bucket ``members`` until every similar pair in it is in one cluster.

    ``root(x)``: the cluster of ``x`` now (a union-find's find). ``check(x, y)``, with
    ``x < y``: verifies the pair, joins the two clusters when they are similar, and
    returns ``(similar, distance)``; similar must imply ``distance <= radius``.
    """
    groups: list[_Group] = []
    for y in members:
        ry = root(y)
        roots = [root(g.any_member()) for g in groups]
        mine = [g for g, r in zip(groups, roots) if r == ry]  # y's cluster, joined before (another band)
        joined: list[_Group] = []
        near: tuple[float, _Ball] | None = None  # the closest centre of a joined cluster, to place y
        for g in (g for g, r in zip(groups, roots) if r != ry):
            hit, best = _visit(g, y, radius, check)
            if hit:
                joined.append(g)
                if best is not None and (near is None or best[0] < near[0]):
                    near = best
        if not mine and not joined:
            groups.append(_Group([_Ball(y)]))
            continue
        keep, *rest = mine + joined
        for g in rest:
            keep.balls += g.balls
            keep.unplaced += g.unplaced
        groups = [g for g in groups if not any(g is m for m in rest)]
        if near is not None:
            insort(near[1].placed, (near[0], y))
        else:
            keep.unplaced.append(y)


def _visit(g: _Group, y: int, radius: float, check: Callable[[int, int], tuple[bool, float]]
           ) -> tuple[bool, tuple[float, _Ball] | None]:
    """Does ``y`` join ``g``? Checks centres, then the members not ruled out."""
    best: tuple[float, _Ball] | None = None
    measured: list[tuple[float, _Ball]] = []
    for ball in g.balls:
        ok, d = _check(ball.centre, y, check)
        if best is None or d < best[0]:
            best = (d, ball)
        if ok:
            return True, best
        measured.append((d, ball))
    if g.unplaced:  # place them now that a member of another cluster needs them
        first = g.balls[0]
        for x in g.unplaced:
            _, dx = _check(first.centre, x, check)
            insort(first.placed, (dx, x))
        g.unplaced = []
    for d, ball in measured:
        lo = bisect_left(ball.placed, (d - radius - MARGIN, -1))
        hi = bisect_right(ball.placed, (d + radius + MARGIN, float("inf")))
        for _, x in ball.placed[lo:hi]:
            if _check(x, y, check)[0]:
                return True, best
    return False, best


def _check(x: int, y: int, check: Callable[[int, int], tuple[bool, float]]) -> tuple[bool, float]:
    return check(x, y) if x < y else check(y, x)
