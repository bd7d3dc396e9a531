"""Self-consistency: the n samples of one prompt vote; samples whose answer is the
majority's are kept, with the agreement rate (majority votes / samples) as their score.

    teachers: [{..., sampling: {n: 8}}]
    filters: [nonempty, {name: self_consistency, answer: math, min_agreement: 0.5}]

It needs all samples of a prompt at once, so the driver holds a prompt's rows until
every sample has come back (failed ones excepted) and sends them to the filters as one
group. On resume, samples of the prompt committed by an earlier run vote too (their
answers come along as ``peer_responses``). A group cut short by a budget votes with the
samples it has. With short-circuiting on, only the samples that passed the filters
before this one vote: list it first to let every sample vote.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import Field

from datagen.filters.base import Context, Filter, FilterSpec, Row, Seed, Verdict


def answer_key(text: str, how: str) -> str | None:
    """The comparable form of an answer: equal keys are the same answer."""
    if how == "math":
        from datagen.filters.math_answer import extract_answer, normalize, to_number

        got = extract_answer(text)
        if got is None:
            return None
        norm = normalize(got)
        num = to_number(norm)
        return f"num:{num[0]}" if num is not None else f"str:{norm.replace(' ', '').lower()}"
    if how == "json":
        from datagen.filters.schema import extract_json
        from datagen.records import canonical_json

        try:
            return canonical_json(extract_json(text))
        except ValueError:
            return None
    words = " ".join(text.lower().split())
    return words or None


class ConsistencySpec(FilterSpec):
    name: Literal["self_consistency"] = "self_consistency"
    answer: Literal["math", "json", "text"] = Field("math", description="how answers are compared")
    min_agreement: float = Field(0.5, gt=0.0, le=1.0, description="majority share needed to keep any sample")
    groups_by_prompt: ClassVar[bool] = True

    def build(self, answer: Any, context: Context) -> Filter:
        return SelfConsistency(self)


class SelfConsistency(Filter):
    name = "self_consistency"
    groups_by_prompt = True

    def __init__(self, spec: ConsistencySpec):
        self.s = spec

    def check(self, row: Row, seed: Seed) -> Verdict:
        return self.check_batch([row], [seed])[0]

    def check_batch(self, rows: Sequence[Row], seeds: Sequence[Seed]) -> list[Verdict]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            groups[r["prompt_id"]].append(i)
        keys = [answer_key(r.get("response") or "", self.s.answer) for r in rows]
        out: list[Verdict | None] = [None] * len(rows)
        for members in groups.values():
            peers = [answer_key(t or "", self.s.answer) for t in rows[members[0]].get("peer_responses") or []]
            votes = [keys[i] for i in members] + peers
            counted = Counter(k for k in votes if k is not None)
            # Ties go to the smallest key, so the verdict does not depend on arrival order.
            majority, top = min(counted.items(), key=lambda kv: (-kv[1], kv[0])) if counted else (None, 0)
            agreement = top / len(votes)
            for i in members:
                details = f"majority {str(majority)[:60]!r}: {top}/{len(votes)} samples"
                if keys[i] is None:
                    out[i] = self.drop("consistency.no_answer", details=details, score=agreement)
                elif agreement < self.s.min_agreement:
                    out[i] = self.drop("consistency.low_agreement", details=details, score=agreement)
                elif keys[i] != majority:
                    out[i] = self.drop("consistency.minority", details=details, score=agreement)
                else:
                    out[i] = self.keep(score=agreement, details=details)
        return [v for v in out if v is not None]
