"""Does datagen's data make a student that replaces its teacher? The support-ticket task,
held-out prompts, five models side by side in one run.

    .venv/bin/datagen run examples/support_tickets.yaml          # the data (once)
    PYTHONPATH=. .venv/bin/python benchmarks/bench_distill.py [--steps 120] [--rounds 2] [--round-steps 20]

The students all start from the same pruned teacher (``init: prune``, ``--keep-every``;
the pruned weights are the "untrained" row) and get the same number of optimizer steps
and the same batch shape:

- ``sft``: cross-entropy on the teacher's accepted answers (``kd_weight: 0``);
- ``kd``: the forward KL to the teacher's stored top-20 on the same rows (``kd_weight: 1``);
- ``kd+onpolicy``: ``kd`` for ``steps - rounds * round_steps`` steps, then ``--rounds``
  rounds of ``datagen onpolicy`` (the student samples ``--round-prompts`` fresh prompts,
  the teacher re-scores them, ``round_steps`` steps of reverse KL each);
- ``teacher``: SmolLM2-135M-Instruct itself.

Every model answers the same held-out prompts (``--heldout``, never trained on: the hash
split ``holdout_fraction`` of ``datagen train``) greedily, through a vLLM engine in a Ray
actor, and is scored against the seed's reference by the ``fields`` filter: the share of
fields right (``order_id``, ``product``: ``field_acc``), both right (``exact``), the same
final answer as the teacher's greedy one (``agree``), and the token KL(teacher || model)
over the teacher's own held-out answers (``kl``, top-20, renormalised). Gap closure =
(model - untrained) / (teacher - untrained) on ``field_acc``. Per-slice field accuracy by
template axis follows. Wall time per model includes everything it took (on-policy: its
sampling and re-scoring engines too). Output: a table, and ``OUT/result.json``.

Measured (2 CPU cores, no GPU; 103 min), on the 3,000-prompt run (458 accepted rows)::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_distill.py --steps 400 --curve-every 80 \
        --batch-size 2 --seq-len 1024 --lr 5e-4 --rounds 2 --round-steps 40 --round-prompts 200 \
        --onpolicy-lr 1e-4 --heldout 300 --kl-rows 100

280 held-out prompts, field_acc (gap closure): teacher 0.505; SFT 0.839 (1.66, exact 0.70);
KD 0.575 (1.14; 0.614 at step 320); KD + on-policy 0.487 (0.96); untrained 0.000. Token KL
to the teacher: SFT 3.63, KD 1.60, KD + on-policy 1.25. The student trained on the
*verified* answers beats its teacher: the ``fields`` filter kept only the 15% of the
teacher's answers that match the reference, so SFT learns a teacher that is always right,
while KD and on-policy rounds pull the student toward the teacher's whole distribution,
its habits that make it wrong included (ids without their prefix, lower-cased names; the
rounds lower the teacher-KL 0.55 -> 0.38 and 0.55 -> 0.45, and field_acc with it). With a
teacher that is right where the verifier cannot see, the order may differ; the bench
measures it rather than assuming it. Per step (batch 2 x 1024 tokens, ~6 examples):
5.5 s SFT, 5.6 s KD.

``--arms sft`` trains only the SFT student: another student size at the recipe that won.
With ``--keep-every 6 --arms sft`` and the flags above (49.6M params; 51 min, the cores
shared with a CI run): field_acc 0.721 (exact 0.50, gap closure 1.42; teacher 0.507 in
that run: vLLM's greedy answers on CPU vary a little with batching), curve 0.06 / 0.31 /
0.48 / 0.66 / 0.72 at steps 80..400.

Not covered: confidence intervals (one seed; the held-out size is printed), and students
of another tokenizer (KD and on-policy need the teacher's).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TEACHER = "embedded:smollm2-135m-instruct"
FIELDS = ["order_id", "product"]
ARMS = ("sft", "kd", "kd+onpolicy")


def heldout(data: Path, fraction: float, n: int) -> list[dict[str, Any]]:
    """Sample 0 of each held-out prompt, from every stream (the teacher's wrong answers too)."""
    from datagen.storage import open_store
    from datagen.train.data import is_heldout

    store = open_store(data)
    out: dict[str, dict[str, Any]] = {}
    for stream in ("accepted", "rejected", "failed"):
        for row in store.iter_rows(stream):
            if row["sample_index"] == 0 and is_heldout(row["prompt_id"], fraction):
                out.setdefault(row["prompt_id"], row)
    rows = sorted(out.values(), key=lambda r: r["prompt_id"])[:n]
    if not rows:
        raise SystemExit(f"{data}: no held-out prompts; run `datagen run examples/support_tickets.yaml` first")
    return rows


def answers(model: str, rows: list[dict[str, Any]], max_tokens: int) -> tuple[dict[str, str], float]:
    from datagen.route.infer import StudentSpec, fleet_answers
    from datagen.teachers.spec import VLLMEngine

    spec = StudentSpec(path=model, logprobs=1, batch_size=64,
                       engine=VLLMEngine(enforce_eager=True, max_model_len=2048, cpu_kvcache_gb=1))
    reqs = [{"row_id": r["row_id"], "messages": r["messages"], "seed": 0} for r in rows]
    got, _, seconds = fleet_answers(spec, reqs, max_tokens=max_tokens)
    return {rid: g["text"] or "" for rid, g in got.items()}, seconds


def score(texts: dict[str, str], rows: list[dict[str, Any]], teacher: dict[str, str] | None) -> dict[str, Any]:
    from datagen.filters.fields import FieldsMatch, FieldsSpec
    from datagen.train.evaluate import final_answer

    check = FieldsMatch(FieldsSpec(fields=FIELDS, ids=["order_id"]))
    acc, exact, agree = [], [], []
    slices: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        ref = json.loads(r["provenance"]["reference"])
        v = check.check({"response": texts[r["row_id"]]}, ref)
        acc.append(v.score)
        exact.append(float(v.keep))
        if teacher is not None:
            agree.append(float(final_answer(texts[r["row_id"]]) == final_answer(teacher[r["row_id"]])))
        for a in r["provenance"].get("axes") or []:
            slices[f"{a['name']}={a['value']}"].append(v.score)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"field_acc": mean(acc), "exact": mean(exact), "agree": mean(agree),
            "slices": {k: mean(v) for k, v in sorted(slices.items())}}


def train_run(label: str, init: str, data: Path, out: Path, *, steps: int, kd_weight: float, args: Any,
              every: int | None = None) -> Any:
    """One student, ``steps`` optimizer steps; a checkpoint every ``every`` steps (all kept)."""
    from datagen.train.config import Data, Loss, Optim, Student, TrainConfig
    from datagen.train.trainer import train

    every = every or steps
    cfg = TrainConfig(name=label, seed=args.seed, data=Data(path=data, holdout_fraction=args.holdout_fraction),
                      student=Student(init="pretrained", path=init),
                      loss=Loss(kd_weight=kd_weight), optim=Optim(lr=args.lr, warmup_steps=10),
                      steps=steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      checkpoint_every=max(every, 1), keep_checkpoints=max(steps // max(every, 1), 1) + 1,
                      device="cpu", output=out / label)
    if (out / label).exists():
        shutil.rmtree(out / label)
    return train(cfg)


def export_checkpoints(run: Path, init: str) -> dict[int, str]:
    """Each training checkpoint of ``run`` as a servable model folder (``run/at/step-N``), for
    the learning curve; the optimizer states are dropped once exported (disk)."""
    import torch

    from datagen.train import student
    from datagen.train.config import Student

    out: dict[int, str] = {}
    for ck in sorted((run / "checkpoints").glob("step-*")):
        step = int(ck.name.split("-")[1])
        model, tok = student.build(Student(init="pretrained", path=init), seed=0)
        model.load_state_dict(torch.load(ck / "state.pt", map_location="cpu", weights_only=False)["model"])
        student.save_final(model, tok, run / "at" / ck.name)
        out[step] = str(run / "at" / ck.name)
        (ck / "state.pt").unlink()
    return out


def onpolicy_run(start: str, out: Path, args: Any) -> list[dict[str, Any]]:
    from datagen.onpolicy import config as opc, run

    cfg = opc.OnPolicyConfig(
        name="bench", seed=args.seed, job=REPO / "examples" / "support_tickets.yaml", student=start,
        holdout_fraction=args.holdout_fraction, rounds=args.rounds,
        sample=opc.Sample(prompts=args.round_prompts, max_tokens=args.max_tokens,
                          engine={"enforce_eager": True, "max_model_len": 2048, "cpu_kvcache_gb": 1}),
        train=opc.RoundTrain(steps=args.round_steps, batch_size=args.batch_size, seq_len=args.seq_len,
                             optim={"lr": args.onpolicy_lr, "warmup_steps": 0}, device="cpu"),
        output=out / "onpolicy")
    if cfg.output.exists():
        shutil.rmtree(cfg.output)
    return run(cfg, say=lambda line: print("  " + line, flush=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / "out" / "support_tickets")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench_distill")
    ap.add_argument("--keep-every", type=int, default=3, help="the pruned student keeps every k-th layer")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per student (equal compute)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--round-steps", type=int, default=20)
    ap.add_argument("--round-prompts", type=int, default=160)
    ap.add_argument("--onpolicy-lr", type=float, default=5e-5)
    ap.add_argument("--heldout", type=int, default=300, help="held-out prompts scored")
    ap.add_argument("--holdout-fraction", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kl-rows", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--curve-every", type=int, default=None,
                    help="score the sft and kd students every N steps too (the learning curve; default: the end)")
    ap.add_argument("--arms", default=",".join(ARMS),
                    help=f"the students trained, of {', '.join(ARMS)} (kd+onpolicy needs kd); the teacher and the "
                         "untrained student are always scored")
    args = ap.parse_args()
    arms = [a for a in ARMS if a in args.arms.split(",")]
    if set(args.arms.split(",")) - set(ARMS) or not arms or ("kd+onpolicy" in arms and "kd" not in arms):
        raise SystemExit(f"--arms: a comma-separated subset of {', '.join(ARMS)}, with kd when kd+onpolicy "
                         f"(got {args.arms!r})")

    import ray

    from datagen.onpolicy.rounds import token_kl
    from datagen.teachers import embedded
    from datagen.train import student
    from datagen.train.config import Student

    t_all = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = heldout(args.data, args.holdout_fraction, args.heldout)
    kl_rows = [r for r in rows if r.get("top_ids") and r.get("token_ids")][:args.kl_rows]
    print(f"held-out prompts: {len(rows)} (KL over the teacher's answers to {len(kl_rows)})", flush=True)

    init_dir = args.out / "init"
    t0 = time.perf_counter()
    model, tok = student.build(Student(init="prune", path=TEACHER, keep_every=args.keep_every), seed=args.seed)
    student.save_final(model, tok, init_dir)
    params = sum(p.numel() for p in model.parameters())
    del model
    models: dict[str, dict[str, Any]] = {"untrained": {"path": str(init_dir), "seconds": time.perf_counter() - t0}}
    print(f"pruned student: keep every {args.keep_every} layers, {params / 1e6:.1f}M params", flush=True)

    base_steps = args.steps - args.rounds * args.round_steps
    every = args.curve_every or args.steps
    if "kd+onpolicy" in arms and base_steps % every:
        raise SystemExit(f"--steps - --rounds * --round-steps ({base_steps}) must be a multiple of --curve-every "
                         f"({every}): the on-policy rounds start from that KD checkpoint")
    curve: dict[str, dict[int, str]] = {}
    per_step: dict[str, float] = {}
    for label, kd_weight in (("sft", 0.0), ("kd", 1.0)):
        if label not in arms:
            continue
        t0 = time.perf_counter()
        res = train_run(label, str(init_dir), args.data, args.out, steps=args.steps, kd_weight=kd_weight, args=args,
                        every=every)
        models[label] = {"path": str(res.final_dir), "seconds": time.perf_counter() - t0, "steps": res.steps,
                         "tokens": sum(s.tokens for s in res.log)}
        per_step[label] = models[label]["seconds"] / max(res.steps, 1)
        curve[label] = export_checkpoints(args.out / label, str(init_dir))
        print(f"{label}: {res.steps} steps in {models[label]['seconds']:.0f} s", flush=True)

    # kd+onpolicy = the kd run up to base_steps (its checkpoint), then the rounds: the same
    # trajectory, so the rounds' effect is the only difference at equal steps.
    rounds: list[dict[str, Any]] = []
    if "kd+onpolicy" in arms:
        t0 = time.perf_counter()
        rounds = onpolicy_run(curve["kd"][base_steps], args.out, args)
        base_s = per_step["kd"] * base_steps
        models["kd+onpolicy"] = {"path": rounds[-1]["next_student"], "seconds": base_s + time.perf_counter() - t0,
                                 "steps": base_steps + sum(r["train_steps"] for r in rounds),
                                 "tokens": int(models["kd"]["tokens"] * base_steps / max(args.steps, 1))
                                 + sum(r["train_tokens"] for r in rounds),
                                 "rounds": rounds}
        print(f"kd+onpolicy: {base_steps} KD steps + {args.rounds} x {args.round_steps} on-policy steps in "
              f"{models['kd+onpolicy']['seconds']:.0f} s", flush=True)
    models["teacher"] = {"path": str(embedded.materialize(TEACHER)), "seconds": 0.0}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    texts: dict[str, dict[str, str]] = {}
    for label in ("teacher", "untrained", *arms):
        texts[label], models[label]["answer_s"] = answers(models[label]["path"], rows, args.max_tokens)
    points: dict[str, dict[int, dict[str, Any]]] = {}  # the learning curve: field_acc by step
    for label, at in curve.items():
        points[label] = {0: {"field_acc": None}}
        for step, path in sorted(at.items()):
            got = texts[label] if step == args.steps else answers(path, rows, args.max_tokens)[0]
            points[label][step] = {k: v for k, v in score(got, rows, texts["teacher"]).items() if k != "slices"}
    ray.shutdown()
    for label, m in models.items():
        m.update(score(texts[label], rows, texts["teacher"]))
        m["answers"] = [texts[label][r["row_id"]] for r in rows[:10]]  # a look at what each model says
        m["kl"] = 0.0 if label == "teacher" else token_kl(m["path"], kl_rows, divergence="forward")
    lo, hi = models["untrained"]["field_acc"], models["teacher"]["field_acc"]
    for m in models.values():
        m["gap_closure"] = (m["field_acc"] - lo) / (hi - lo) if hi != lo else None
    for label in points:
        points[label][0] = {k: models["untrained"][k] for k in ("field_acc", "exact", "agree")}
        for p in points[label].values():
            p["gap_closure"] = (p["field_acc"] - lo) / (hi - lo) if hi != lo else None

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"support tickets, {len(rows)} held-out prompts (greedy, vLLM): student = teacher pruned to "
                    f"every {args.keep_every}th layer, {params / 1e6:.1f}M params; {args.steps} steps each")
    for col in ("model", "field_acc", "exact", "agree w/ teacher", "token KL", "gap closure", "steps", "tokens",
                "wall s"):
        t.add_column(col, justify="right")
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for label, m in models.items():
        t.add_row(label, f(m["field_acc"]), f(m["exact"]), f(m["agree"]), f(m["kl"]), f(m["gap_closure"], 2),
                  str(m.get("steps", "-")), str(m.get("tokens", "-")), f"{m['seconds']:.0f}")
    s = Table(title="field accuracy by template axis (the edge cases)")
    s.add_column("slice")
    for label in models:
        s.add_column(label, justify="right")
    for k in models["teacher"]["slices"]:
        s.add_row(k, *(f(m["slices"].get(k)) for m in models.values()))
    r = Table(title="on-policy rounds: teacher-KL (reverse) of each round's student on its own samples")
    for col in ("round", "samples", "KL before", "KL after", "sample s", "score s", "train s"):
        r.add_column(col, justify="right")
    for e in rounds:
        r.add_row(str(e["round"]), str(e["rows"].get("accepted", 0)), f(e["teacher_kl_before"], 4),
                  f(e["teacher_kl_after"], 4), *(f"{e['seconds'][k]:.0f}" for k in ("sample", "score", "train")))
    lc = Table(title=f"learning curve: held-out field_acc (gap closure) by optimizer step; teacher {f(hi)}")
    lc.add_column("step", justify="right")
    for label in points:
        lc.add_column(label, justify="right")
    for step in sorted({k for p in points.values() for k in p}):
        lc.add_row(str(step), *(f"{f(points[lb][step]['field_acc'])} ({f(points[lb][step]['gap_closure'], 2)})"
                                if step in points[lb] else "-" for lb in points))
    c = Console(width=140)
    for table in (t, lc, s, *([r] if rounds else [])):
        c.print(table)
    wall = time.perf_counter() - t_all
    c.print(f"wall time {wall:.0f} s")
    (args.out / "result.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "heldout": len(rows), "params": params, "wall_s": wall,
                                                      "models": models, "curve": points}, indent=1))


if __name__ == "__main__":
    main()
