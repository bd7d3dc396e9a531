"""``PromptStream``: the deterministic request sequence of a job."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from datagen import records
from datagen.config import Job
from datagen.prompts.plan import Plan, make_plan
from datagen.prompts.spec import load_template


@dataclass(frozen=True)
class Request:
    """One teacher call, which becomes exactly one row (accepted, rejected or failed)."""

    row_id: str
    prompt_id: str
    sample_index: int
    seed: int
    messages: list[dict[str, str]]
    teacher: str
    provenance: dict[str, Any]


class PromptStream:
    """The deterministic request sequence of a job: same job file, same requests, same ids.

    Order: the plan's prompts (see ``plan.py``: seeds shuffled by the job seed, axis values
    dealt by quota, duplicates and contaminated prompts replaced), then for each prompt
    every teacher and every sample index. Without axes or cleaning this is the first
    ``count`` seeds in shuffled order; ``count`` larger than the seeds is an error rather
    than silent repetition, since repeated prompts would collide on row id.
    """

    def __init__(self, job: Job, *, run_fingerprint: str):
        self.job = job
        self.template = load_template(job.prompts.template, seeds=job.prompts.seeds)
        # Renders every planned prompt once: the template is checked against every seed
        # before a teacher token is paid for. Iteration renders again, lazily, so memory
        # does not grow with the number of requests.
        self.plan: Plan = make_plan(self.template, job.prompts, job.seed)
        self.run_fingerprint = run_fingerprint  # what rows carry in provenance (``run.identity``)
        # teacher name -> license id of its terms, resolved by ``run.identity.prepare``
        self.licenses: dict[str, str] | None = None

    @cached_property
    def stream_hash(self) -> str:
        """The prompts' content: template, the seeds drawn, the plan, the eval sets screened
        against. Part of the run fingerprint, so a changed seed file is a different run."""
        t, plan = self.template, self.plan
        return records.content_hash({
            "template": t.spec.model_dump(mode="json", exclude={"seeds"}),
            "seeds": [t.seeds.rows[i] for i in sorted({i for i, _ in plan.slots})],
            "plan": [[t.seeds.ids[i], list(combo)] for i, combo in plan.slots],
            "evals": plan.report.get("evals_digest"),
        })

    @property
    def seeds(self) -> list[dict[str, Any]]:
        """The seed row behind each planned prompt, in stream order."""
        return [self.template.seeds.rows[i] for i, _ in self.plan.slots]

    def __len__(self) -> int:
        return len(self.plan.slots) * sum(t.sampling.n for t in self.job.teachers)

    def prompt(self, k: int) -> tuple[list[dict[str, str]], dict[str, Any]]:
        """(messages, provenance without the run fingerprint) of the k-th planned prompt."""
        spec = self.template.spec
        i, combo = self.plan.slots[k]
        row = self.template.seeds.rows[i]
        axes = self.plan.axes
        messages = self.template.render({**row, **dict(zip(axes, combo))} if axes else row)
        return messages, {
            "job": self.job.name,
            "template_id": spec.id,
            "template_version": spec.version,
            "template_hash": self.template.text_hash,
            "seed_source": str(spec.seeds.path),
            "seed_ids": [self.template.seeds.ids[i]],
            "axes": [{"name": a, "value": v} for a, v in zip(axes, combo)] if axes else None,
            "reference": records.canonical_json({c: row[c] for c in spec.reference}) if spec.reference else None,
        }

    def __iter__(self) -> Iterator[Request]:
        for k in range(len(self.plan.slots)):
            messages, provenance = self.prompt(k)
            pid = records.prompt_id(messages)
            provenance["run_fingerprint"] = self.run_fingerprint
            for teacher in self.job.teachers:
                ident = {"name": teacher.name, "backend": teacher.backend, "model": teacher.model}
                sampling = teacher.sampling.identity() | {"job_seed": self.job.seed}
                for k in range(teacher.sampling.n):
                    rid = records.row_id(messages=messages, teacher=ident, sampling=sampling, sample_index=k)
                    yield Request(
                        row_id=rid,
                        prompt_id=pid,
                        sample_index=k,
                        seed=int(records.content_hash([self.job.seed, rid], size=4), 16) & 0x7FFFFFFF,
                        messages=messages,
                        teacher=teacher.name,
                        provenance=provenance,
                    )
