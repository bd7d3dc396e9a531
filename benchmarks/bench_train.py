"""Training tokens/s: datagen's trainer vs TRL's SFTTrainer, same tiny model, data and CPU.

    .venv/bin/python benchmarks/bench_train.py [--data out/quickstart] [--steps 40]

Both train examples/train.yaml's tiny Llama (same seed) on the same accepted rows
(train split), SFT on the completion only, packed to ``--seq-len`` tokens, ``--batch-size``
sequences per step, float32, for ``--steps`` steps, one after the other in this run.
tokens/s = real (non-padding) tokens processed / wall time of the training loop; TRL's
figure is its own ``num_tokens`` metric over its ``train_runtime``. datagen's KD mode is
timed too, for reference.

TRL lives in its own virtualenv (``~/.cache/datagen/bench-trl-venv``), created on first
use: a ``.pth`` file puts this environment's site-packages on its path (torch,
transformers, datasets are shared, not re-downloaded) and pip adds only ``trl``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRL_VENV = Path(os.environ.get("DATAGEN_CACHE", Path.home() / ".cache" / "datagen")) / "bench-trl-venv"


def trl_python() -> Path:
    py = TRL_VENV / "bin" / "python"
    if not (TRL_VENV / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        Path(purelib, "datagen-host.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "-c", str(REPO / "constraints-cpu.txt"), "trl"], check=True)
        (TRL_VENV / ".ready").touch()
    return py


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
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        return trl_worker(args)

    import yaml

    sys.path.insert(0, str(REPO))
    from datagen.train import data
    from datagen.train.config import load_train
    from datagen.train.trainer import train

    work = Path(tempfile.mkdtemp(prefix="datagen-bench-train-"))
    base = yaml.safe_load((REPO / "examples" / "train.yaml").read_text())
    base.update(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, checkpoint_every=10**6)
    base["data"]["path"] = str(Path(args.data).resolve())
    results = {}
    for label, kd_weight in (("datagen SFT", 0.0), ("datagen KD+CE", 0.5)):
        cfg = dict(base, loss={**base["loss"], "kd_weight": kd_weight}, output=str(work / label.replace(" ", "-")))
        (work / "train.yaml").write_text(yaml.safe_dump(cfg))
        res = train(load_train(work / "train.yaml"))
        results[label] = res.tokens_per_s
        print(f"{label}: {res.steps} steps, {res.tokens_per_s:,.0f} tok/s", flush=True)

    # TRL: the same rows, as prompt/completion conversations
    cfg = load_train(work / "train.yaml")
    with open(work / "rows.jsonl", "w") as f:
        for row in data.select_rows(cfg.data, split="train"):
            f.write(json.dumps({"prompt": row["messages"],
                                "completion": [{"role": "assistant", "content": row["response"]}]}) + "\n")
    from datagen.train.student import resolve

    (work / "spec.json").write_text(json.dumps({
        "tokenizer": resolve(cfg.student.tokenizer), "config": cfg.student.config, "seed": cfg.seed,
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": cfg.optim.lr,
        "warmup": cfg.optim.warmup_steps}))
    start = time.perf_counter()
    proc = subprocess.run([str(trl_python()), __file__, "--trl-worker", str(work)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        sys.exit(f"TRL run failed:\n{proc.stderr[-3000:]}")
    trl = json.loads(proc.stdout.strip().splitlines()[-1])
    results["TRL SFTTrainer"] = trl["tokens"] / trl["runtime_s"]
    print(f"TRL SFTTrainer: {trl['steps']} steps, {results['TRL SFTTrainer']:,.0f} tok/s "
          f"({trl['tokens']} tokens in {trl['runtime_s']:.1f} s; process {time.perf_counter() - start:.0f} s)")
    ratio = results["datagen SFT"] / results["TRL SFTTrainer"]
    print(f"ratio datagen SFT / TRL SFTTrainer: {ratio:.2f} (target >= 1.0)")
    print(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "tokens_per_s": {k: round(v, 1) for k, v in results.items()}, "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
