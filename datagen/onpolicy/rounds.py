"""Rounds of on-policy distillation, each one three committed steps.

Round ``r`` (its files under ``OUTPUT/round-r/``):

1. ``samples/``: the current student answers a fresh draw of the job's prompts. This is
   an ordinary datagen run whose teacher is the student, a vLLM engine in a Ray actor
   (``TeacherFleet``), so the store is exactly-once and resumable, inspectable and
   exportable like any other; each row holds the student's tokens and its log-prob of
   each one (``token_logprobs_q``), and ``provenance.teacher`` names the checkpoint.
2. ``scored/``: the teacher scores those very tokens, teacher-forced (``datagen.rescore``:
   its top-k at every position of the student's answer), a derived store with the same
   row ids.
3. ``student/``: ``datagen train`` from the round's student on the scored rows with the
   reverse KL (``loss.divergence: reverse``, ``kd_weight: 1``, ``losses.reverse_kl_loss``),
   checkpointed; ``student/final`` is the next round's student.

``rounds.json`` records each finished round: the student that sampled, row counts, the
teacher-KL of that student on its own samples (before the update) and of the updated
student on the same samples, and the seconds each step took.

Resume: the same command run again. A finished round is skipped; an unfinished one goes
on from what each step committed (the run resumes its store, the re-score its partial
build, the trainer its last checkpoint). Row ids are the run's deterministic ids, so a
killed round commits the same ids as an uninterrupted one.

Not covered: held-out prompts are drawn and sampled like the others (the prompt plan does
not know the split); the trainer drops them (``holdout_fraction``), so they are never
trained on. One teacher, self-hosted; the sampling student runs on the job's runtime.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from datagen.errors import ConfigError, DatagenError
from datagen.onpolicy.config import OnPolicyConfig
from datagen.storage.shards import atomic_write_text

ROUNDS = "rounds.json"


class RoundInterrupted(DatagenError):
    """Stopped (Ctrl-C, SIGTERM) mid-round: what each step committed is kept."""

KL_ROWS = 64  # samples the per-round teacher-KL is measured on


def run(cfg: OnPolicyConfig, *, say: Callable[[str], None] = lambda line: None) -> list[dict[str, Any]]:
    """Run (or resume) every round; the list of ``rounds.json`` entries."""
    from datagen.config import load_job

    job = load_job(cfg.job)
    teacher = _teacher(job, cfg.teacher)
    check_tokenizers(cfg.student, teacher.model, teacher.name)
    cfg.output.mkdir(parents=True, exist_ok=True)
    done = _read(cfg.output)
    student = cfg.student
    for r in range(cfg.rounds):
        rdir = cfg.output / f"round-{r}"
        if r < len(done):
            if done[r]["student"] != student:
                raise DatagenError(f"{cfg.output / ROUNDS}: round {r} was sampled by {done[r]['student']}, this "
                                   f"file starts from {student}; choose another output")
            student = done[r]["next_student"]
            continue
        say(f"round {r}: sampling {cfg.sample.prompts} prompts from {student}")
        t0 = time.perf_counter()
        samples = sample(job, teacher, student, cfg, r, rdir / "samples")
        t1 = time.perf_counter()
        say(f"round {r}: the teacher {teacher.name} scores the student's tokens")
        scored = _score(samples, teacher, rdir / "scored", job.runtime)
        t2 = time.perf_counter()
        train_cfg = round_train_config(cfg, student, scored, rdir / "student", r)
        rows = _kl_rows(train_cfg)
        kl_before = token_kl(student, rows)
        say(f"round {r}: teacher-KL on its own samples {kl_before:.4f}; training {cfg.train.steps} steps")
        result = _train(train_cfg)
        t3 = time.perf_counter()
        entry = {
            "round": r, "student": student, "next_student": str(result.final_dir),
            "samples": str(samples), "scored": str(scored), "rows": _count(scored),
            "teacher_kl_before": kl_before, "teacher_kl_after": token_kl(str(result.final_dir), rows),
            "kl_rows": len(rows), "train_steps": result.steps,
            "train_tokens": sum(s.tokens for s in result.log),
            "seconds": {"sample": round(t1 - t0, 1), "score": round(t2 - t1, 1), "train": round(t3 - t2, 1)},
        }
        done.append(entry)
        atomic_write_text(cfg.output / ROUNDS, json.dumps(done, indent=1))
        student = entry["next_student"]
    return done


def _read(out: Path) -> list[dict[str, Any]]:
    p = out / ROUNDS
    return json.loads(p.read_text()) if p.exists() else []


def _teacher(job: Any, name: str | None) -> Any:
    cands = [t for t in job.teachers if name in (None, t.name)]
    if not cands:
        raise ConfigError(f"teacher: the job has no teacher named {name!r} "
                          f"(it has {', '.join(t.name for t in job.teachers)})")
    t = cands[0]
    if not type(t).rescores:
        raise ConfigError(f"teacher {t.name}: on-policy rounds need a self-hosted vLLM teacher (backend: vllm) "
                          "to score the student's tokens; an API returns no distribution over a given text")
    return t


def check_tokenizers(student_path: str, teacher_model: str, teacher_name: str) -> None:
    """One line when the student's tokenizer is not the teacher's: the teacher scores the
    student's token ids, which mean nothing in another vocabulary."""
    from datagen.train import student as st

    s, t = st.fingerprint(st.load_tokenizer(student_path)), st.fingerprint(st.load_tokenizer(teacher_model))
    if s != t:
        raise ConfigError(f"student {student_path}: its tokenizer ({s}) is not the teacher {teacher_name}'s "
                          f"({t}); on-policy distillation scores the student's token ids with the teacher, so "
                          "they must share one (build the student with init: prune, or on the teacher's tokenizer)")


def sample_job(job: Any, teacher: Any, student: str, cfg: OnPolicyConfig, r: int, dest: Path) -> Any:
    """The job of round ``r``'s sampling: the job's prompts (a fresh draw), the student as
    its only teacher under the teacher's license (the student learned from its outputs),
    no filters (every sample is a training signal; a failed one has no tokens)."""
    from datagen.licenses import resolve_job
    from datagen.teachers.spec import Sampling, VLLMTeacher

    engine = cfg.sample.engine or teacher.engine
    spec = VLLMTeacher(name="student", backend="vllm", model=student, license=resolve_job(job)[teacher.name],
                       sampling=Sampling(temperature=cfg.sample.temperature, max_tokens=cfg.sample.max_tokens,
                                         n=1, logprobs=1),
                       batch_size=cfg.sample.batch_size, engine=engine, num_cpus=teacher.num_cpus)
    return job.model_copy(update={
        "name": f"{cfg.name}-round-{r}", "seed": cfg.seed + 1000 * (r + 1),
        "prompts": job.prompts.model_copy(update={"count": cfg.sample.prompts}),
        "teachers": [spec], "filters": [], "target_accepted": None,
        "output": job.output.model_copy(update={"path": dest}),
        "dedupe": job.dedupe.model_copy(update={"streaming": False}),
    })


def sample(job: Any, teacher: Any, student: str, cfg: OnPolicyConfig, r: int, dest: Path) -> Path:
    """Run (or resume) round ``r``'s sampling into ``dest``; raises RunInterrupted when stopped."""
    from datagen.route.infer import check_servable
    from datagen.run import execute, open_output, prepare

    rjob = sample_job(job, teacher, student, cfg, r, dest)
    check_servable(student, rjob.teachers[0].engine.max_model_len)  # the engine the student gets
    stream, fingerprint = prepare(rjob)
    # a changed round (another student, another draw) is refused by the resume check
    store, _ = open_output(rjob, stream, fingerprint, resume=(dest / "manifest.json").exists())
    try:
        stats = execute(rjob, store, stream)
    finally:
        store.close()
    if stats.interrupted:
        raise RoundInterrupted(f"interrupted while sampling round {r}: committed rows are safe; "
                             "the same command goes on from them")
    return dest


def _score(samples: Path, teacher: Any, dest: Path, runtime: Any) -> Path:
    from datagen.rescore import rescore

    k = teacher.sampling.logprobs or 20
    scorer = teacher.model_copy(update={"sampling": teacher.sampling.model_copy(update={"logprobs": k})})
    if not dest.exists():
        rescore(samples, scorer, dest=dest, runtime=runtime)
    return dest


def round_train_config(cfg: OnPolicyConfig, student: str, scored: Path, dest: Path, r: int) -> Any:
    from datagen.train.config import Data, Loss, Student, TrainConfig

    t = cfg.train
    return TrainConfig(name=f"{cfg.name}-round-{r}", seed=cfg.seed + r,
                       data=Data(path=scored, holdout_fraction=cfg.holdout_fraction),
                       student=Student(init="pretrained", path=student),
                       loss=Loss(kd_weight=1.0, divergence="reverse", kd_tail="bucket"),
                       optim=t.optim, steps=t.steps, batch_size=t.batch_size, seq_len=t.seq_len,
                       checkpoint_every=t.checkpoint_every, device=t.device, output=dest)


def _train(tc: Any) -> Any:
    from datagen.train import checkpoint
    from datagen.train.trainer import train

    # a trainer that had saved its last step goes on from it (no step left: it saves final/ again);
    # one killed before its first checkpoint left only a log behind: start it again
    resume = checkpoint.latest(tc.output / "checkpoints") is not None
    if not resume and tc.output.exists():
        shutil.rmtree(tc.output)
    return train(tc, resume=resume)


def _kl_rows(tc: Any) -> list[dict[str, Any]]:
    from datagen.train.data import select_rows

    rows = []
    for row in select_rows(tc.data, split="train"):
        rows.append(row)
        if len(rows) == KL_ROWS:
            break
    if not rows:
        raise DatagenError(f"{tc.data.path}: no scored samples to train on (every sample failed, or all fell in "
                           "the held-out prompts)")
    return rows


def token_kl(model_path: str, rows: list[dict[str, Any]], *, divergence: str = "reverse",
             device: str = "cpu") -> float:
    """Mean per-token KL between the model at ``model_path`` and the teacher whose top-k
    ``rows`` hold, over the rows' tokens: ``reverse`` KL(student || teacher)
    (``losses.reverse_kl_loss``) or ``forward`` KL(teacher || student) (``losses.kd_loss``)."""
    from datagen.train import data, student as st
    from datagen.train.evaluate import load_model, teacher_forced

    model, tok = load_model(model_path, device)
    enc = data.Encoder(tok, fingerprint=st.fingerprint(tok), use_kd=True, seq_len=1 << 20)
    total = n = 0.0
    for row in rows:
        kd = data.read_kd(row)
        if kd is None or not kd.token_ids:
            continue
        _, kl = teacher_forced(model, enc, row, k=max(len(t) for t in kd.top_ids), device=device,
                               divergence=divergence)
        if kl is not None:
            total, n = total + kl.sum().item(), n + kl.numel()
    return total / n if n else float("nan")


def _count(store_path: Path) -> dict[str, int]:
    from datagen.storage import open_store

    return dict(open_store(store_path).manifest.counts())
