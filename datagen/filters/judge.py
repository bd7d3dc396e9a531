"""LLM judge: one of the job's teachers grades each answer with a rubric from
``filters/rubrics/``, and a row is kept when its score reaches ``threshold``.

    filters:
      - {name: judge, teacher: grader, rubric: quality, threshold: 7}

The judge must be an ``openai``-backend teacher of the job (it is called from the filter
actors through the same client, retries and key handling as generation; note that it
also generates rows like any teacher of the job). Its prompt and reply are stored in the
verdict's details, its score in the verdict's score. A judge that cannot answer (API
down after its retries) or answers without a score raises: that is not a verdict.

Flow control: the filter actors split the teacher's ``max_concurrency``, request and
token budgets evenly between them, as its replicas do (``OpenAITeacher.for_replica``),
and each keeps one client and limiter for its whole life, so budgets, adaptive
concurrency and open connections carry over from batch to batch. Grading comes on top
of generation: the key then sees up to the teacher's budgets from each side (there is
no limiter shared across processes). More filter actors than ``max_concurrency`` get
one request in flight each.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from datagen.filters.assets import asset_yaml
from datagen.filters.base import Context, Filter, FilterError, FilterSpec, Row, Seed, Verdict


class JudgeSpec(FilterSpec):
    name: Literal["judge"] = "judge"
    teacher: str = Field(min_length=1, description="an openai-backend teacher of this job")
    rubric: str = Field("quality", pattern=r"^[a-z0-9_-]+$", description="filters/rubrics/<rubric>.yaml")
    threshold: float = Field(7.0, description="keep when score >= threshold")
    reference_field: str | None = Field(None, description="a seed field shown to the judge as the reference")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(256, ge=1, le=32768)

    def build(self, answer: Any, context: Context) -> Filter:
        return Judge(self, context)


def load_rubric(name: str) -> dict[str, Any]:
    data = asset_yaml("rubrics", name)
    if "user" not in data or "score_pattern" not in data:
        raise FilterError(f"judge: rubric {name!r} needs at least `user` and `score_pattern`")
    return data


class Judge(Filter):
    name = "judge"

    def __init__(self, spec: JudgeSpec, context: Context):
        import jinja2
        from pydantic import TypeAdapter

        from datagen.teachers import build
        from datagen.teachers.spec import Teacher

        teachers = (context or {}).get("teachers") or {}
        cfg = teachers.get(spec.teacher)
        if cfg is None:
            raise FilterError(f"filters: judge: teacher {spec.teacher!r} is not one of the job's teachers "
                              f"({', '.join(teachers) or 'none'})")
        if cfg.get("backend") != "openai":
            raise FilterError(f"filters: judge: teacher {spec.teacher!r} must have backend openai "
                              f"(got {cfg.get('backend')})")
        # The judge's own sampling: deterministic grading, no logprobs, one sample.
        sampling = {**cfg.get("sampling", {}), "temperature": spec.temperature, "max_tokens": spec.max_tokens,
                    "logprobs": None, "n": 1}
        judge = TypeAdapter(Teacher).validate_python({**cfg, "sampling": sampling, "replicas": 1})
        worker = (context or {}).get("worker") or {"index": 0, "count": 1}
        shares = min(worker["count"], judge.max_concurrency)
        if shares > 1:  # this filter actor's share of the teacher's flow control
            judge = judge.model_copy(update={"replicas": shares}).for_replica(worker["index"] % shares)
        self.teacher = build(judge)
        self._loop: asyncio.AbstractEventLoop | None = None  # the client's, kept across batches
        self.s = spec
        rubric = load_rubric(spec.rubric)
        env = jinja2.Environment(undefined=jinja2.StrictUndefined)
        self.system = rubric.get("system")
        self.user = env.from_string(rubric["user"])
        self.score = re.compile(rubric["score_pattern"])

    def prompt(self, row: Row, seed: Seed) -> list[dict[str, str]]:
        values = {"question": (row.get("messages") or [{}])[-1].get("content", ""),
                  "answer": row.get("response") or ""}
        if self.s.reference_field:
            values["reference"] = (seed or {}).get(self.s.reference_field, "")
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": self.user.render(values).strip()}]

    def check(self, row: Row, seed: Seed) -> Verdict:
        return self.check_batch([row], [seed])[0]

    def check_batch(self, rows: Sequence[Row], seeds: Sequence[Seed]) -> list[Verdict]:
        from datagen.records import content_hash

        prompts = [self.prompt(r, s) for r, s in zip(rows, seeds)]
        requests = [{"row_id": r["row_id"], "messages": p, "seed": int(content_hash(["judge", r["row_id"]], size=4), 16)
                     & 0x7FFFFFFF} for r, p in zip(rows, prompts)]
        # The teacher is async (its limiter bounds the requests in flight); the filter
        # worker is not, so it runs the batch on the judge's own loop, the same every
        # batch: a new loop would mean a new client and limiter (budgets refilled,
        # concurrency back to its slow start, new connections) every batch.
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        gens = self._loop.run_until_complete(self.teacher.generate(requests))
        out = []
        for p, gen in zip(prompts, gens):
            if gen.error:
                raise FilterError(f"judge {self.s.teacher!r} could not grade: {gen.error}")
            reply = gen.text or ""
            found = self.score.findall(reply)
            if not found:
                raise FilterError(f"judge {self.s.teacher!r} replied without a score: {reply[-120:]!r}")
            score = float(found[-1])
            details = json.dumps({"judge": self.s.teacher, "rubric": self.s.rubric, "prompt": p, "reply": reply},
                                 ensure_ascii=False)
            if score >= self.s.threshold:
                out.append(Verdict(self.name, True, "ok", score, details))
            else:
                out.append(Verdict(self.name, False, "judge.low_score", score, details))
        return out
