"""Training tokens/s: datagen on 1 process and on 2 Ray Train workers vs TRL's SFTTrainer,
same tiny model, data and CPU.

    .venv/bin/python benchmarks/bench_train.py [--data out/quickstart] [--steps 40]

All train examples/train.yaml's tiny Llama (same seed) on the same accepted rows
(train split), SFT on the completion only, packed to ``--seq-len`` tokens, a global batch
of ``--batch-size`` sequences per step (2 workers: half each), float32, for ``--steps``
steps, one after the other in this run. tokens/s = real (non-padding) tokens processed /
wall time of the training loop (for Ray Train: rank 0's loop, global tokens; the start of
the cluster and the workers is reported apart); TRL's figure is its own ``num_tokens``
metric over its ``train_runtime``. datagen's KD mode is timed too, for reference.

On a 2-core machine two workers share the cores one process already uses (torch runs
one thread per core; Ray gives each worker one), and add a gradient all-reduce per step:
expect a ratio near or below 1. Data parallelism pays where each worker has its own
cores or GPU.

TRL comes from the dev extra (``pip install -e .[dev]``); without it that row is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        return trl_worker(args)

    import yaml

    sys.path.insert(0, str(REPO))
    from datagen.train import data, ray_train
    from datagen.train.config import load_train
    from datagen.train.trainer import train

    work = Path(tempfile.mkdtemp(prefix="datagen-bench-train-"))
    base = yaml.safe_load((REPO / "examples" / "train.yaml").read_text())
    base.update(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, checkpoint_every=10**6)
    base["data"]["path"] = str(Path(args.data).resolve())
    results = {}

    def cfg_for(label: str, **over: object) -> Path:
        path = work / f"{label.replace(' ', '-')}.yaml"
        path.write_text(yaml.safe_dump({**base, "output": str(work / label.replace(" ", "-")), **over}))
        return path

    for label, kd_weight in (("datagen SFT 1 process", 0.0), ("datagen KD+CE 1 process", 0.5)):
        res = train(load_train(cfg_for(label, loss={**base["loss"], "kd_weight": kd_weight})))
        results[label] = res.tokens_per_s
        print(f"{label}: {res.steps} steps, {res.tokens_per_s:,.0f} tok/s", flush=True)

    import ray

    label = "datagen SFT 2 workers"
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    cfg = load_train(cfg_for(label, loss={**base["loss"], "kd_weight": 0.0}, batch_size=args.batch_size // 2,
                             scaling={"workers": 2, "strategy": "ddp"}))
    res = ray_train.run(cfg)
    wall = time.perf_counter() - start
    ray.shutdown()
    results[label] = res["tokens_per_s"]
    print(f"{label} (Ray Train, DDP, gloo): {res['steps']} steps, {res['tokens_per_s']:,.0f} tok/s in the loop; "
          f"{wall:.0f} s wall with the cluster and worker start", flush=True)

    # TRL: the same rows, as prompt/completion conversations
    cfg = load_train(cfg_for("trl", loss={**base["loss"], "kd_weight": 0.0}))
    with open(work / "rows.jsonl", "w") as f:
        for row in data.select_rows(cfg.data, split="train"):
            f.write(json.dumps({"prompt": row["messages"],
                                "completion": [{"role": "assistant", "content": row["response"]}]}) + "\n")
    from datagen.train.student import resolve

    (work / "spec.json").write_text(json.dumps({
        "tokenizer": resolve(cfg.student.tokenizer), "config": cfg.student.config, "seed": cfg.seed,
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": cfg.optim.lr,
        "warmup": cfg.optim.warmup_steps}))
    one = results["datagen SFT 1 process"]
    ratios = {"2 workers / 1 process": results["datagen SFT 2 workers"] / one}
    if importlib.util.find_spec("trl") is None:
        print("TRL SFTTrainer: skipped (trl is not installed; it is in the dev extra)")
    else:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--trl-worker", str(work)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            sys.exit(f"TRL run failed:\n{proc.stderr[-3000:]}")
        trl = json.loads(proc.stdout.strip().splitlines()[-1])
        results["TRL SFTTrainer"] = trl["tokens"] / trl["runtime_s"]
        print(f"TRL SFTTrainer: {trl['steps']} steps, {results['TRL SFTTrainer']:,.0f} tok/s "
              f"({trl['tokens']} tokens in {trl['runtime_s']:.1f} s; process {time.perf_counter() - start:.0f} s)")
        ratios["datagen 1 process / TRL"] = one / results["TRL SFTTrainer"]
        ratios["datagen 2 workers / TRL"] = results["datagen SFT 2 workers"] / results["TRL SFTTrainer"]
    for name, ratio in ratios.items():
        print(f"ratio {name}: {ratio:.2f}")
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "cpus": os.cpu_count(), "tokens_per_s": {k: round(v, 1) for k, v in results.items()},
                      "ratios": {k: round(v, 3) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
