"""The student answers an eval set, through the same machinery as generation, and the eval
table ``route/report.py`` reads comes out.

``student.backend``:

``vllm`` (default)
    The student folder (a ``datagen train`` output's ``final/`` or any HF folder) as a
    ``VLLMTeacher`` in a ``TeacherFleet``: a vLLM engine in a Ray actor (CPU here, GPU on
    a cluster), fed batches, its top-k log-probs captured, lost work re-run as in a run.
``openai``
    Any OpenAI-compatible endpoint that serves the student, through the same fleet.
``hf``
    The fallback: transformers, one prompt at a time (``train/evaluate.py``'s path), with
    log-probs from the generation's logits. Slow; for a student vLLM cannot serve.

Each prompt gets the routed answer (temperature 0) and, with ``samples: n``, n more at
``temperature`` (seeds 1..n) for the ``agreement`` signal. ``student_seconds`` is the
inference wall time (after the engine is up) over the eval rows, the same on every row:
what one answer cost this student on this hardware, samples included.

The eval file's ``teacher:`` (a job's teacher entry, ``vllm`` or ``openai``) answers,
through the same fleet (``teacher_answers``), before the student runs: for a traffic
file, the rows without a teacher answer; for a datagen output, every held-out prompt
again, replacing the run's answers -- the teacher at the settings it would serve with
(greedy, say) rather than the run's sampling. Each runs in a Ray instance of its own, so
two engines never share a 2-core machine.

Each eval row: ``id``, ``q_student``, ``q_teacher``, ``quality`` (the method,
``evalset.Quality``), ``signals`` (``signals.signals`` of the student's answer; its
log-prob arrays are not kept), both answers' text, the identities, the student's
``student_tokenizer`` (its fingerprint: the log-prob signals are over its tokens), the
slices and the token counts. ``OUTPUT.meta.json`` beside it holds the eval set's counts (held out,
contaminated, ...), the quality method and the throughput; ``datagen route report`` shows it.

Ray, vLLM and torch are imported only when a backend runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from datagen.errors import DatagenError
from datagen.route import evalset, signals
from datagen.teachers.spec import Teacher, VLLMEngine
from datagen.validation import Strict, read_model

# Head sizes vLLM's CPU attention serves (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class StudentSpec(Strict):
    path: str = Field(description="the student's HF folder (a `datagen train` output's final/)")
    name: str = "student"
    backend: Literal["vllm", "openai", "hf"] = "vllm"
    base_url: str | None = Field(None, description="backend openai: the endpoint serving the student")
    model: str | None = Field(None, description="backend openai: the served model name (default: path)")
    api_key_env: str | None = None
    engine: VLLMEngine = Field(default_factory=lambda: VLLMEngine(enforce_eager=True))
    num_gpus: float = Field(0.0, ge=0.0)
    logprobs: int = Field(5, ge=1, le=20, description="top-k log-probs per token (the entropy signal)")
    max_tokens: int | None = Field(None, ge=1, description="default: the teacher's max_tokens (else 256)")
    samples: int = Field(0, ge=0, le=16, description="extra samples per prompt (agreement)")
    temperature: float = Field(0.7, gt=0.0, le=2.0, description="the extra samples' temperature")
    batch_size: int = Field(16, ge=1, le=4096)

    @model_validator(mode="after")
    def _endpoint(self) -> StudentSpec:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("student.base_url is required for backend: openai")
        return self


class Source(Strict):
    path: Path | None = Field(None, description="a datagen output: its held-out prompts")
    traffic: Path | None = Field(None, description="your own file (JSONL / CSV / Parquet)")
    holdout_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="the train file's value")
    teacher: str = Field("teacher", description="traffic: the name of the teacher that answered")
    id_fields: list[str] = Field(default_factory=list, description="traffic with JSON-object references: "
                                 "fields compared by their digits (order numbers), as the fields filter's ids")
    screen: evalset.Screen = Field(default_factory=evalset.Screen)

    @model_validator(mode="after")
    def _one(self) -> Source:
        if (self.path is None) == (self.traffic is None):
            raise ValueError("give exactly one of path (a datagen output) or traffic (a file)")
        return self


class RouteEval(Strict):
    data: Source
    student: StudentSpec
    teacher: Teacher | None = Field(None, description="the teacher (a job's teacher entry, vllm or openai) that "
                                    "answers the traffic rows without a teacher_response, or every held-out prompt "
                                    "of a datagen output again (its serving settings instead of the run's)")
    max_rows: int = Field(200, ge=1)
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray instance")
    output: Path = Field(description="the eval table (JSONL) for `datagen route report`")

    @model_validator(mode="after")
    def _teacher_online(self) -> RouteEval:
        if getattr(self.teacher, "in_batches", False):  # answered by provider batch jobs, not fleet actors
            raise ValueError("teacher: mode batch is not served through the teacher fleet; use mode: online")
        return self


def load(path: str | os.PathLike[str]) -> RouteEval:
    path = Path(path)
    cfg = read_model(path, RouteEval, what="route eval file")
    base = path.parent.resolve()

    def rel(p: Any) -> Any:
        return p if p is None or str(p).startswith(("embedded:", "s3://")) or Path(p).is_absolute() \
            else type(p)((base / p).resolve())

    data = cfg.data.model_copy(update={"path": rel(cfg.data.path), "traffic": rel(cfg.data.traffic)})
    student = cfg.student if cfg.student.backend == "openai" else \
        cfg.student.model_copy(update={"path": rel(cfg.student.path)})
    return cfg.model_copy(update={"data": data, "student": student, "output": rel(cfg.output)})


def check_servable(folder: str, max_model_len: int | None = None) -> None:
    """One line when vLLM's CPU attention cannot serve the student's head size, or its
    context is shorter than ``engine.max_model_len`` (vLLM's own error says neither)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise DatagenError(f"student {folder}: no config.json (a `datagen train` output's final/ or an HF folder)")
    c = json.loads(config.read_text())
    heads = c.get("num_attention_heads")
    head = c.get("head_dim") or (c["hidden_size"] // heads if heads and c.get("hidden_size") else None)
    if head is not None and head not in CPU_HEAD_SIZES:
        raise DatagenError(
            f"student {folder}: head size {head} (hidden_size / num_attention_heads) is not one vLLM's CPU "
            f"attention serves ({', '.join(map(str, CPU_HEAD_SIZES))}); train a student with e.g. "
            "hidden_size 64 and 2 heads, or set student.backend: hf")
    if max_model_len is not None and max_model_len > c.get("max_position_embeddings", max_model_len):
        raise DatagenError(f"student {folder}: student.engine.max_model_len {max_model_len} exceeds its "
                           f"max_position_embeddings {c['max_position_embeddings']}; lower it or leave it unset")


# --------------------------------------------------------------------------- answers


def requests(items: list[dict[str, Any]], spec: StudentSpec) -> list[dict[str, Any]]:
    """The routed answer (seed 0, the spec's temperature 0) and the extra samples of each item."""
    out = []
    for it in items:
        out.append({"row_id": f"{it['id']}/0", "messages": it["messages"], "seed": 0})
        out += [{"row_id": f"{it['id']}/{j}", "messages": it["messages"], "seed": j, "temperature": spec.temperature}
                for j in range(1, spec.samples + 1)]
    return out


def _teacher_spec(spec: StudentSpec, max_tokens: int) -> Any:
    from pydantic import TypeAdapter

    from datagen.teachers.spec import Teacher

    common = {"name": spec.name, "batch_size": spec.batch_size, "license": "LicenseRef-student",
              "sampling": {"temperature": 0.0, "max_tokens": max_tokens, "logprobs": spec.logprobs}}
    if spec.backend == "openai":
        return TypeAdapter(Teacher).validate_python({**common, "backend": "openai", "base_url": spec.base_url,
                                                     "model": spec.model or spec.path,
                                                     "api_key_env": spec.api_key_env})
    return TypeAdapter(Teacher).validate_python({**common, "backend": "vllm", "model": spec.path,
                                                 "engine": spec.engine.model_dump(), "num_gpus": spec.num_gpus})


def _call(actor: Any, work: list[Any], options: dict[str, Any]) -> Any:
    return (actor.generate.options(**options) if options else actor.generate).remote(work)


def fleet_answers(spec: StudentSpec, reqs: list[dict[str, Any]], *, max_tokens: int,
                  num_cpus: int | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any], float]:
    """The student's generations by row id through a ``TeacherFleet``, its ``info()``, and
    the seconds from the first batch sent to the last collected (engine start-up excluded)."""
    if spec.backend == "vllm" and spec.num_gpus == 0:
        check_servable(spec.path, spec.engine.max_model_len)
    return generate(_teacher_spec(spec, max_tokens), reqs, who=f"student {spec.path}", num_cpus=num_cpus)


def generate(teacher: Any, reqs: list[dict[str, Any]], *, who: str, num_cpus: int | None = None
            ) -> tuple[dict[str, dict[str, Any]], dict[str, Any], float]:
    """Generations by row id from one teacher spec (the student's, or the eval file's
    teacher) in a ``TeacherFleet`` of its own, in a Ray instance started for it unless
    one is up (then joined and left running)."""
    import ray

    from datagen.config import Runtime
    from datagen.run.cluster import init_ray
    from datagen.teachers.fleet import TeacherFleet, TeacherLost, TeacherRaised

    runtime = Runtime(num_cpus=num_cpus)
    started = init_ray(runtime)
    try:
        fleet = TeacherFleet([teacher], startup_timeout_s=runtime.startup_timeout_s, call=_call,
                             key=lambda r: r["row_id"])
        try:
            fleet.wait_started(runtime.startup_timeout_s, lambda: False)
            out: dict[str, dict[str, Any]] = {}
            t0 = time.perf_counter()
            fleet.feed(teacher.name, (reqs[i:i + teacher.batch_size] for i in range(0, len(reqs), teacher.batch_size)),
                       lambda answer: out.update((r["row_id"], g) for r, g in zip(answer.work, answer.results)))
            return out, fleet.info[teacher.name], time.perf_counter() - t0
        except (TeacherRaised, TeacherLost) as exc:
            raise DatagenError(f"{who}: {exc}") from None
        finally:
            fleet.close()
    finally:
        if started:
            ray.shutdown()


def hf_answers(spec: StudentSpec, reqs: list[dict[str, Any]], *, max_tokens: int,
               device: str = "cpu") -> tuple[dict[str, dict[str, Any]], dict[str, Any], float]:
    """The fallback: one prompt at a time with transformers, log-probs from the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from datagen.train import data, student

    tok = student.load_tokenizer(spec.path)
    model = AutoModelForCausalLM.from_pretrained(student.resolve(spec.path), dtype=torch.float32).to(device).eval()
    out: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for r in reqs:
        ids = torch.tensor([data.prompt_ids(tok, r["messages"])], device=device)
        temp = r.get("temperature")
        torch.manual_seed(r["seed"])
        with torch.no_grad():
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                               do_sample=temp is not None, temperature=temp, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, output_logits=True, return_dict_in_generate=True)
        new = g.sequences[0, ids.shape[1]:].tolist()
        lps = [torch.log_softmax(x[0].float(), -1) for x in g.logits]
        top = [lp.topk(spec.logprobs) for lp in lps]
        out[r["row_id"]] = {
            "text": tok.decode(new, skip_special_tokens=True), "error": None,
            "finish_reason": "stop" if new and new[-1] == tok.eos_token_id else "length",
            "completion_tokens": len(new), "token_logprobs": [float(lp[t]) for lp, t in zip(lps, new)],
            "top_logprobs": [t.values.tolist() for t in top]}
    return out, {"tokenizer_fingerprint": student.fingerprint(tok)}, time.perf_counter() - t0


# --------------------------------------------------------------------------- the eval table


def build(cfg: RouteEval) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The eval rows and the eval set's summary (``OUTPUT.meta.json``)."""
    from datagen.train.evaluate import final_answer

    src = cfg.data
    es = (evalset.from_output(src.path, holdout_fraction=src.holdout_fraction, max_rows=cfg.max_rows,
                              screen=src.screen, answered_again=cfg.teacher is not None) if src.path is not None
          else evalset.from_file(src.traffic, max_rows=cfg.max_rows, teacher=src.teacher,
                                 answers=cfg.teacher is not None, id_fields=src.id_fields))
    teacher_run = teacher_answers(cfg, es, again=src.path is not None) if cfg.teacher is not None else None
    items, spec = es.items, cfg.student
    max_tokens = spec.max_tokens or max(((it.get("sampling") or {}).get("max_tokens") or 0 for it in items),
                                        default=0) or 256
    reqs = requests(items, spec)
    run = hf_answers if spec.backend == "hf" else fleet_answers
    kw = {} if spec.backend == "hf" else {"num_cpus": cfg.num_cpus}
    gens, info, seconds = run(spec, reqs, max_tokens=max_tokens, **kw)
    answers = []
    for it in items:
        g = gens[f"{it['id']}/0"]
        if g.get("error"):
            raise DatagenError(f"student {spec.path}: prompt {it['id']}: {g['error']}")
        answers.append({"response": g["text"], "finish_reason": g["finish_reason"]})
    q_s = es.quality.score(items, answers, max_tokens)
    q_t = es.quality.score(items, [evalset.teacher_answer(it) for it in items])
    checks = es.quality.serving_checks(items, answers, max_tokens)
    ident = {"name": spec.name, "model": spec.path, "revision": info.get("revision")}
    per_row = seconds / len(items)
    rows = []
    for i, (it, a) in enumerate(zip(items, answers)):
        g = gens[f"{it['id']}/0"]
        samples = [gens[f"{it['id']}/{j}"].get("text") for j in range(1, spec.samples + 1)]
        sig = signals.signals({"response": a["response"], "token_logprobs": g.get("token_logprobs"),
                               "top_logprobs": g.get("top_logprobs"), "samples": samples,
                               "verdicts": checks[i] if checks else None},
                              key=lambda t: final_answer(t) or None)
        rows.append({
            "id": it["id"], "q_student": q_s[i], "q_teacher": q_t[i], "quality": es.quality.method,
            "signals": sig, "response": a["response"], "teacher_response": it.get("teacher_response"),
            "student": ident, "student_tokenizer": info.get("tokenizer_fingerprint"), "teacher": it["teacher"],
            "stream": it["stream"], "axes": it.get("axes"), "seed_source": it.get("seed_source"),
            "prompt_tokens": it.get("prompt_tokens"), "cluster_size": it.get("cluster_size"),
            "teacher_completion_tokens": it.get("teacher_completion_tokens"),
            "student_completion_tokens": g.get("completion_tokens"), "student_seconds": per_row,
        })
    summary = {"source": str(src.path or src.traffic), "quality": es.quality.method, "counts": dict(es.counts),
               "student": ident, "backend": spec.backend, "student_tokenizer": info.get("tokenizer_fingerprint"),
               "requests": len(reqs), "seconds": seconds, "rows_per_s": len(items) / seconds if seconds else None}
    if teacher_run is not None:
        summary["teacher_run"] = teacher_run
    return rows, summary


def teacher_answers(cfg: RouteEval, es: evalset.EvalSet, *, again: bool = False) -> dict[str, Any]:
    """The eval file's teacher answers the rows that have no teacher answer (every row,
    ``again``: a datagen output's held-out prompts, the run's answers replaced), through
    the same fleet as the student (its own sampling, one answer per prompt). Every row
    then carries that teacher's identity: a traffic file's answers are taken as its own.
    A teacher that fails on a row: the row scores 0 for the teacher against references,
    and is dropped (counted: ``no_teacher_answer``) when the teacher is the gold. Returns
    what ran (for ``OUTPUT.meta.json``)."""
    t = cfg.teacher
    todo = list(es.items) if again else [it for it in es.items if it["teacher_response"] is None]
    if again:  # nothing of the run's answers stays (``stream``: whose answer)
        for it in todo:
            it.update(stream="eval_teacher", teacher_response=None, teacher_finish=None, prompt_tokens=None,
                      teacher_completion_tokens=None, sampling=t.sampling.model_dump(mode="json"))
    info: dict[str, Any] = {}
    seconds = 0.0
    if todo:
        reqs = [{"row_id": f"{it['id']}/teacher", "messages": it["messages"], "seed": 0} for it in todo]
        gens, info, seconds = generate(t, reqs, who=f"teacher {t.name!r}", num_cpus=cfg.num_cpus)
        for it in todo:
            g = gens[f"{it['id']}/teacher"]
            if g.get("error"):
                es.counts["teacher_failed"] += 1
                continue
            it.update(teacher_response=g["text"], teacher_finish=g["finish_reason"],
                      prompt_tokens=g.get("prompt_tokens"), teacher_completion_tokens=g.get("completion_tokens"),
                      sampling=t.sampling.model_dump(mode="json"))
    ident = {"name": t.name, "model": t.model, "revision": info.get("revision") or t.revision}
    for it in es.items:
        it["teacher"] = ident
    if es.quality.method == "teacher_agreement":
        kept = [it for it in es.items if it["teacher_response"] is not None]
        es.counts["no_teacher_answer"] += len(es.items) - len(kept)
        es.items[:] = kept
        if not kept:
            raise DatagenError(f"teacher {t.name!r} answered none of the {len(todo)} "
                               f"{'held-out prompts' if again else 'rows without a teacher answer'}, and with no "
                               "references the teacher is the gold: nothing to score")
    es.counts["rows"] = len(es.items)
    return {"teacher": ident, "answered": len(todo) - es.counts["teacher_failed"], "failed": es.counts["teacher_failed"],
            "seconds": seconds}


def write(cfg: RouteEval, rows: list[dict[str, Any]], summary: dict[str, Any]) -> Path:
    from datagen.storage.shards import atomic_write_text

    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.output, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(meta_path(cfg.output), json.dumps(summary, indent=1))
    return cfg.output


def meta_path(eval_file: str | Path) -> Path:
    return Path(str(eval_file) + ".meta.json")
