"""Teacher-driven seed expansion: Evol-Instruct and Self-Instruct (``datagen expand``).

Both read the job's seed source, ask one of the job's teachers (built from
``datagen.teachers``, called in-process; no Ray) for new instructions, drop the failed
ones, and write a *new seed file* (JSONL) plus ``FILE.meta.json`` with the method, the
teacher, both licenses and the drop counts. A template then uses that file as its seeds,
so expansion is a stage before generation whose output a person can read and version.

* **Evol-Instruct** (Xu et al., WizardLM): each round rewrites every parent with one
  mutation, chosen per parent from the job seed: four in-depth mutations (add a
  constraint, deepen, concretise, require more reasoning steps) and one in-breadth
  mutation (a new, rarer prompt in the same domain). Survivors are the next round's
  parents.
* **Self-Instruct** (Wang et al.): each request shows a few tasks sampled from the seeds
  and the tasks accepted so far and asks for one new task, until ``count`` are accepted.

**Elimination** (the step that drops failed evolutions), checked in this order:
``refusal`` (an apology or "I can't" instead of a prompt), ``too_short`` (fewer than
``MIN_WORDS`` words), ``prompt_leak`` (the rewriter's scaffolding, e.g. "#Rewritten
Prompt#", copied into the output), ``no_change`` (word-set Jaccard with the parent at or
above ``NO_CHANGE``), ``near_duplicate`` (a near-duplicate of a seed or of an output kept
before it, MinHash from ``minhash``). A teacher call that fails is counted as ``failed``,
never as a verdict, and written nowhere.

Not covered: WizardLM's second elimination check (whether the teacher can *answer* the
evolved prompt) is left to the generation run's own filters; reference answers (a math
answer, unit tests) do not survive a mutation, so those columns are not copied to the
outputs.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datagen import licenses, records
from datagen.dedupe import minhash
from datagen.config import Job, PromptDedupe
from datagen.errors import ConfigError
from datagen.prompts.clean import NearDuplicates
from datagen.prompts.spec import load_template

MIN_WORDS = 4
NO_CHANGE = 0.9

_REWRITE = (
    "I want you to act as a Prompt Rewriter. Rewrite the given prompt into a more complex version that "
    "famous AI systems would find a bit harder to handle, while it stays reasonable and answerable by a "
    "person. {how} Keep everything the given prompt says, and add no more than 10 to 20 words. Do not "
    "mention the given prompt or the rewritten prompt. Reply with the rewritten prompt only.\n\n"
    "#Given Prompt#:\n{prompt}"
)
_BREADTH = (
    "I want you to act as a Prompt Creator. Draw inspiration from the given prompt to create a brand-new "
    "prompt in the same domain, on a rarer topic, of similar length and difficulty. Do not mention the "
    "given prompt. Reply with the new prompt only.\n\n#Given Prompt#:\n{prompt}"
)
MUTATIONS = {  # name -> (kind, instruction)
    "constraints": ("depth", "Add one more constraint or requirement to it."),
    "deepen": ("depth", "If it asks about a specific issue, increase the depth and breadth of the inquiry."),
    "concretize": ("depth", "Replace general concepts with more specific ones."),
    "reasoning": ("depth", "If it can be solved in a few simple steps, make it explicitly require "
                           "several steps of reasoning."),
    "breadth": ("breadth", ""),
}
_SELF_INSTRUCT = (
    "Here are some example tasks:\n{examples}\n\nCome up with one new task that is different from all of "
    "these: another topic or another kind of request, answerable in text by a capable assistant. Reply with "
    "the task only."
)
_REFUSAL = re.compile(r"^\W*(i'?m sorry|sorry|i am sorry|i apologi[sz]e|i can(?:no|')t|i cannot|i am unable|"
                      r"i'?m unable|as an ai|unfortunately,? i)", re.IGNORECASE)
_LEAK = re.compile(r"#\s*(given|rewritten|created|new) prompt|\b(given|rewritten) prompt\b", re.IGNORECASE)
_WORDS = minhash.Shingling(kind="word")


def eliminate(parent: str | None, text: str) -> str | None:
    """Why a candidate instruction fails, or None if it may be kept (dedupe aside)."""
    if _REFUSAL.search(text):
        return "refusal"
    words = _WORDS.words(text)
    if len(words) < MIN_WORDS:
        return "too_short"
    if _LEAK.search(text):
        return "prompt_leak"
    if parent is not None:
        a, b = set(words), set(_WORDS.words(parent))
        if len(a & b) / max(len(a | b), 1) >= NO_CHANGE:
            return "no_change"
    return None


def _clean(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


@dataclass
class ExpandResult:
    path: Path
    written: int
    dropped: dict[str, int] = field(default_factory=dict)
    failed: int = 0


class _Expander:
    def __init__(self, job: Job, *, teacher: str | None, field: str | None):
        self.job = job
        self.template = load_template(job.prompts.template, seeds=job.prompts.seeds)
        names = [t.name for t in job.teachers]
        name = teacher or names[0]
        if name not in names:
            raise ConfigError(f"--teacher: no teacher named {name!r} in the job (it has {', '.join(names)})")
        self.cfg = next(t for t in job.teachers if t.name == name)
        self.teacher_license = licenses.resolve_job(job)[name]
        rows = self.template.seeds.rows
        text_vars = sorted(v for v in self.template.variables if isinstance(rows[0].get(v), str))
        if field is None:
            if len(text_vars) != 1:
                raise ConfigError(f"--field: say which template variable holds the instruction "
                                  f"(one of {', '.join(text_vars) or 'none found'})")
            field = text_vars[0]
        if field not in rows[0]:
            raise ConfigError(f"--field: the seed rows have no column {field!r}")
        self.field = field
        self.dropped: dict[str, int] = {}
        self.failed = 0
        self._teacher: Any = None
        self.index = NearDuplicates(PromptDedupe())
        texts = [str(r[field]) for r in rows]
        for text, keys in zip(texts, self.index.keys(texts)):
            self.index.check(text, keys)

    def ask(self, prompts: list[str]) -> list[str | None]:
        """One teacher call per prompt; None where the call failed (counted, not a verdict)."""
        from datagen.teachers import build

        reqs = []
        for p in prompts:
            rid = records.content_hash({"expand": p, "job_seed": self.job.seed})
            reqs.append({"row_id": rid, "messages": [{"role": "user", "content": p}],
                         "seed": int(rid[:8], 16) & 0x7FFFFFFF})
        if self._teacher is None:
            self._teacher = build(self.cfg)  # once: a vLLM engine takes a while to start
        gens = asyncio.run(self._teacher.generate(reqs))
        out = []
        for g in gens:
            if g.error or g.text is None:
                self.failed += 1
                out.append(None)
            else:
                out.append(_clean(g.text))
        return out

    def close(self) -> None:
        close = getattr(self._teacher, "close", None)
        if close is not None:
            close()

    def judge(self, parent: str | None, text: str) -> bool:
        reason = eliminate(parent, text)
        if reason is None and self.index.check(text, self.index.keys([text])[0]):
            reason = "near_duplicate"
        if reason is not None:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
        return reason is None


def evol_instruct(job: Job, *, out: Path, teacher: str | None = None, field: str | None = None,
                  rounds: int = 1, limit: int | None = None) -> ExpandResult:
    _refuse_existing(out)  # before any teacher token is paid for
    ex = _Expander(job, teacher=teacher, field=field)
    try:
        return _evol(ex, job, out, rounds, limit)
    finally:
        ex.close()


def _evol(ex: _Expander, job: Job, out: Path, rounds: int, limit: int | None) -> ExpandResult:
    seeds = ex.template.seeds
    skip = set(ex.template.spec.reference) | {ex.template.spec.seeds.id_field or ""}
    order = list(range(len(seeds.rows)))
    random.Random(job.seed).shuffle(order)
    parents = [(seeds.ids[i], str(seeds.rows[i][ex.field]), {k: v for k, v in seeds.rows[i].items()
                                                             if k not in skip and k != ex.field})
               for i in order[:limit]]
    written = []
    for r in range(1, rounds + 1):
        picks = [random.Random(f"{job.seed}/{pid}/{r}").choice(sorted(MUTATIONS)) for pid, _, _ in parents]
        asks = [(_BREADTH.format(prompt=text) if MUTATIONS[m][0] == "breadth"
                 else _REWRITE.format(how=MUTATIONS[m][1], prompt=text)) for (_, text, _), m in zip(parents, picks)]
        answers = ex.ask(asks)
        survivors = []
        for (pid, text, extra), mutation, new in zip(parents, picks, answers):
            if new is None or not ex.judge(None if mutation == "breadth" else text, new):
                continue
            nid = f"evol-{records.content_hash([pid, mutation, new], size=6)}"
            written.append({"id": nid, ex.field: new, **extra, "parent_id": pid, "mutation": mutation,
                            "kind": MUTATIONS[mutation][0], "round": r})
            survivors.append((nid, new, extra))
        parents = survivors
    return _write(ex, out, written, {"method": "evol-instruct", "rounds": rounds})


def self_instruct(job: Job, *, out: Path, count: int, teacher: str | None = None, field: str | None = None,
                  examples: int = 3, max_requests: int | None = None) -> ExpandResult:
    _refuse_existing(out)
    ex = _Expander(job, teacher=teacher, field=field)
    try:
        return _self_instruct(ex, job, out, count, examples, max_requests or 3 * count)
    finally:
        ex.close()


def _self_instruct(ex: _Expander, job: Job, out: Path, count: int, examples: int, budget: int) -> ExpandResult:
    seeds = ex.template.seeds
    pool = [(sid, str(row[ex.field])) for sid, row in zip(seeds.ids, seeds.rows)]
    written: list[dict[str, Any]] = []
    asked = 0
    while len(written) < count and asked < budget:
        n = min(count - len(written), budget - asked)
        shown = []
        for k in range(n):
            rng = random.Random(f"{job.seed}/self-instruct/{asked + k}")
            mine = [(w["id"], w[ex.field]) for w in written]
            shown.append(rng.sample(pool, min(examples, len(pool))) + rng.sample(mine, min(1, len(mine))))
        asks = [_SELF_INSTRUCT.format(examples="\n".join(f"{i + 1}. {t}" for i, (_, t) in enumerate(s)))
                for s in shown]
        asked += n
        for s, new in zip(shown, ex.ask(asks)):
            if new is None or not ex.judge(None, new) or len(written) >= count:
                continue
            written.append({"id": f"self-{records.content_hash(new, size=6)}", ex.field: new,
                            "examples": [sid for sid, _ in s]})
    return _write(ex, out, written, {"method": "self-instruct", "requests": asked, "requested": count})


def _refuse_existing(out: Path) -> None:
    if out.exists():
        raise ConfigError(f"{out} exists; expand writes a new seed file (remove it or pick another --out)")


def _write(ex: _Expander, out: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> ExpandResult:
    """The new seed file and its sidecar, each through a temp file and a rename."""
    _refuse_existing(out)
    spec = ex.template.spec
    sidecar = {
        **meta, "field": ex.field, "written": len(rows), "dropped": dict(sorted(ex.dropped.items())),
        "failed": ex.failed,
        "teacher": {"name": ex.cfg.name, "backend": ex.cfg.backend, "model": ex.cfg.model,
                    "license": ex.teacher_license},
        "source": {"path": str(spec.seeds.path), "license": spec.seeds.license},
        "note": "outputs are bound by both the teacher's terms and the source seeds' license: declare them "
                "in the template that uses this file",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((out.with_name(out.name + ".meta.json"), json.dumps(sidecar, indent=1)),
                       (out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return ExpandResult(path=out, written=len(rows), dropped=sidecar["dropped"], failed=ex.failed)
