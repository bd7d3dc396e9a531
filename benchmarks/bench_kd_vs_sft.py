"""KD vs SFT on the same data, student init, steps and seed: prints both eval results.

    .venv/bin/python benchmarks/bench_kd_vs_sft.py [--data out/quickstart] [--steps 150]

Both students start from examples/train.yaml's tiny Llama (same seed, so the same
weights) and see the same batches; only ``loss.kd_weight`` differs (0.5 vs 0). Both are
then scored by ``datagen eval`` on the held-out prompts (examples/eval.yaml's settings).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402

from datagen.train.config import load_eval, load_train  # noqa: E402
from datagen.train.evaluate import evaluate, table  # noqa: E402
from datagen.train.trainer import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO / "out" / "quickstart"), help="a datagen output with logprobs")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--kd-weight", type=float, default=0.5)
    ap.add_argument("--max-rows", type=int, default=20, help="held-out rows to score")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="datagen-kd-vs-sft-"))
    base = yaml.safe_load((REPO / "examples" / "train.yaml").read_text())
    base.update(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, checkpoint_every=args.steps)
    base["data"]["path"] = str(Path(args.data).resolve())
    finals = {}
    for label, kd_weight in (("kd", args.kd_weight), ("sft", 0.0)):
        cfg = dict(base, loss={**base["loss"], "kd_weight": kd_weight}, output=str(work / label))
        (work / f"{label}.yaml").write_text(yaml.safe_dump(cfg))
        start = time.perf_counter()
        res = train(load_train(work / f"{label}.yaml"))
        print(f"{label}: kd_weight {kd_weight}, {res.steps} steps in {time.perf_counter() - start:.0f} s "
              f"({res.tokens_per_s:,.0f} tok/s), final train loss {res.log[-1].loss:.4f}", flush=True)
        finals[label] = str(res.final_dir)

    ev = yaml.safe_load((REPO / "examples" / "eval.yaml").read_text())
    ev.update(students=finals, max_rows=args.max_rows, output=str(work / "eval.json"))
    ev["data"]["path"] = base["data"]["path"]
    (work / "eval.yaml").write_text(yaml.safe_dump(ev))
    report = evaluate(load_eval(work / "eval.yaml"))
    Console(width=120).print(table(report))
    kd, sft = report["students"]["kd"], report["students"]["sft"]
    for m in ("token_kl", "perplexity", "answer_agreement", "verifier_pass"):
        if kd.get(m) is not None and sft.get(m) is not None:
            print(f"{m}: kd {kd[m]:.4f} vs sft {sft[m]:.4f}")
    print(json.dumps({"steps": args.steps, "rows": report["rows"], "kd": kd, "sft": sft}))


if __name__ == "__main__":
    main()
