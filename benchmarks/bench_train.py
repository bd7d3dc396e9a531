"""Training tokens/s: datagen on 1 process and on 2 Ray Train workers vs TRL's SFTTrainer,
same tiny model, data and CPU.

    .venv/bin/python benchmarks/bench_train.py [--data out/quickstart] [--steps 40] [--rounds 2]

All train examples/train.yaml's tiny Llama (same seed) on the same accepted rows
(train split), SFT on the completion only, packed to ``--seq-len`` tokens, a global batch
of ``--batch-size`` sequences per step (2 workers: half each), float32, for ``--steps``
steps, one after the other in this run. tokens/s = real (non-padding) tokens processed /
wall time of the training loop (for Ray Train: rank 0's loop, global tokens; the start of
the cluster and the workers is reported apart); TRL's figure is its own ``num_tokens``
metric over its ``train_runtime``. datagen's KD mode is timed too, for reference. The
contenders run in turn, ``--rounds`` times, and the medians are compared: on a shared
machine a single pass measures the neighbours' load as much as the trainer.

On a 2-core machine two workers share the cores one process already uses (torch runs
one thread per core; Ray gives each 1-CPU worker one thread) and add a gradient
all-reduce per step: on an idle machine expect a ratio near or below 1. On a busy one,
one process's two cooperating threads stall whenever either is descheduled, while two
single-thread workers do not: the "1 process, 1 thread" row measures that effect apart.
Data parallelism pays where each worker has its own cores or GPU.

TRL comes from the dev extra (``pip install -e .[dev]``); without it that row is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def trl_worker(args: argparse.Namespace) -> None:
    """Runs inside the TRL venv: SFTTrainer on the JSONL the parent wrote."""
    import torch
    from datasets import load_dataset
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    spec = json.loads(Path(args.trl_worker, "spec.json").read_text())
    tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
    fields = dict(spec["config"])
    model_type = fields.pop("model_type")
    fields.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), dtype=torch.float32)
    ds = load_dataset("json", data_files=str(Path(args.trl_worker, "rows.jsonl")), split="train")
    cfg = SFTConfig(output_dir=str(Path(args.trl_worker, "trl-out")), max_steps=spec["steps"],
                    per_device_train_batch_size=spec["batch_size"], max_length=spec["seq_len"], packing=True,
                    learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=spec["warmup"],
                    logging_steps=spec["steps"], save_strategy="no", report_to="none", use_cpu=True,
                    bf16=False, fp16=False, seed=spec["seed"], dataloader_num_workers=0,
                    disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    out = trainer.train()
    tokens = trainer._metrics["train"]["num_tokens"][-1] if trainer._metrics["train"].get("num_tokens") \
        else trainer._total_train_tokens
    print(json.dumps({"tokens": int(tokens), "runtime_s": out.metrics["train_runtime"], "steps": out.global_step,
                      "loss": out.training_loss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO / "out" / "quickstart"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4, help="global batch (packed sequences per step)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2,
                    help="each contender runs once per round, interleaved; the median is reported")
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        return trl_worker(args)

    import ray
    import yaml

    sys.path.insert(0, str(REPO))
    from datagen.train import data, ray_train
    from datagen.train.config import load_train
    from datagen.train.student import resolve
    from datagen.train.trainer import train

    work = Path(tempfile.mkdtemp(prefix="datagen-bench-train-"))
    base = yaml.safe_load((REPO / "examples" / "train.yaml").read_text())
    base.update(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, checkpoint_every=10**6)
    base["data"]["path"] = str(Path(args.data).resolve())
    sft = {**base["loss"], "kd_weight": 0.0}

    def cfg_for(label: str, rnd: int, **over: object) -> Any:
        name = f"{label.replace(' ', '-')}-{rnd}"
        (work / f"{name}.yaml").write_text(yaml.safe_dump({**base, "output": str(work / name), **over}))
        return load_train(work / f"{name}.yaml")

    # TRL: the same rows, as prompt/completion conversations
    cfg = cfg_for("trl", 0, loss=sft)
    with open(work / "rows.jsonl", "w") as f:
        for row in data.select_rows(cfg.data, split="train"):
            f.write(json.dumps({"prompt": row["messages"],
                                "completion": [{"role": "assistant", "content": row["response"]}]}) + "\n")
    (work / "spec.json").write_text(json.dumps({
        "tokenizer": resolve(cfg.student.tokenizer), "config": cfg.student.config, "seed": cfg.seed,
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": cfg.optim.lr,
        "warmup": cfg.optim.warmup_steps}))
    have_trl = importlib.util.find_spec("trl") is not None
    if not have_trl:
        print("TRL SFTTrainer: skipped (trl is not installed; it is in the dev extra)")

    def one_process(rnd: int) -> float:
        return train(cfg_for("sft-1", rnd, loss=sft)).tokens_per_s

    def one_process_one_thread(rnd: int) -> float:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # what each Ray worker gets (Ray sets OMP_NUM_THREADS=1 for a 1-CPU worker)
        try:
            return train(cfg_for("sft-1t", rnd, loss=sft)).tokens_per_s
        finally:
            torch.set_num_threads(threads)

    def two_workers(rnd: int) -> float:
        start = time.perf_counter()
        res = ray_train.run(cfg_for("sft-2", rnd, loss=sft, batch_size=args.batch_size // 2,
                                    scaling={"workers": 2, "strategy": "ddp"}))
        print(f"  (2 workers: {time.perf_counter() - start:.0f} s wall with the worker start)", flush=True)
        return res["tokens_per_s"]

    def kd_one_process(rnd: int) -> float:
        return train(cfg_for("kd-1", rnd)).tokens_per_s

    def trl(rnd: int) -> float:
        proc = subprocess.run([sys.executable, __file__, "--trl-worker", str(work)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            sys.exit(f"TRL run failed:\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return out["tokens"] / out["runtime_s"]

    contenders = {"datagen SFT 1 process": one_process, "datagen SFT 2 workers (Ray Train, DDP, gloo)": two_workers,
                  "datagen SFT 1 process, 1 thread": one_process_one_thread, "datagen KD+CE 1 process": kd_one_process}
    if have_trl:
        contenders["TRL SFTTrainer"] = trl
    train(cfg_for("warm-up", 0, steps=2))  # one-time costs (imports, first kernels) out of round 1
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    seen: dict[str, list[float]] = {k: [] for k in contenders}
    try:
        for rnd in range(args.rounds):
            for label, fn in contenders.items():
                seen[label].append(fn(rnd))
                print(f"round {rnd + 1}: {label}: {seen[label][-1]:,.0f} tok/s", flush=True)
    finally:
        ray.shutdown()
    med = {k: statistics.median(v) for k, v in seen.items()}
    one, two = med["datagen SFT 1 process"], med["datagen SFT 2 workers (Ray Train, DDP, gloo)"]
    ratios = {"2 workers / 1 process": two / one,
              "1 process 1 thread / 1 process": med["datagen SFT 1 process, 1 thread"] / one}
    if have_trl:
        ratios["datagen 1 process / TRL"] = one / med["TRL SFTTrainer"]
        ratios["datagen 2 workers / TRL"] = two / med["TRL SFTTrainer"]
    for label, v in med.items():
        print(f"{label}: median {v:,.0f} tok/s over {args.rounds} rounds")
    for name, ratio in ratios.items():
        print(f"ratio {name}: {ratio:.2f}")
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "rounds": args.rounds, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
                      "tokens_per_s": {k: [round(x, 1) for x in v] for k, v in seen.items()},
                      "ratios": {k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
