"""Student eval throughput (rows/s): the vLLM student actor of ``datagen route eval`` vs the
one-prompt-at-a-time HF path of ``datagen eval`` (``train/evaluate._generate``), the same
prompts, the same student, in one run.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_route_eval.py [--rows 200] [--max-tokens 32] [--student DIR]

The student is examples/train.yaml's tiny Llama (random init, seed 0) unless ``--student``
names an HF folder. Prompts: the support-extract seed messages, each with a ticket number
so all ``--rows`` differ. Both decode greedily up to ``--max-tokens`` (an untrained model
rarely stops early, so both produce about the same tokens: how many answers ran to
``--max-tokens`` is printed for each).
vLLM: the wall time from the first batch sent to the last answer collected, engine start
excluded (printed apart), top-5 log-probs captured; HF: the loop over the prompts, model
load excluded, no log-probs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def prompts(n: int) -> list[list[dict[str, str]]]:
    seeds = [json.loads(line)["message"] for line in (REPO / "prompts" / "seeds" / "support_messages.jsonl")
             .read_text().splitlines() if line.strip()]
    system = "Extract the order number and the product from the customer's message. Reply with JSON only."
    return [[{"role": "system", "content": system},
             {"role": "user", "content": f"{seeds[i % len(seeds)]} (ticket {i})"}] for i in range(n)]


def tiny_student(dest: Path) -> str:
    import yaml

    from datagen.train import student
    from datagen.train.config import Student

    cfg = yaml.safe_load((REPO / "examples" / "train.yaml").read_text())["student"]
    model, tok = student.build(Student.model_validate(cfg), seed=0)
    student.save_final(model, tok, dest)
    return str(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--student")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    from datagen.route.infer import StudentSpec, fleet_answers

    msgs = prompts(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.student or tiny_student(Path(tmp) / "student")
        spec = StudentSpec(path=path, batch_size=args.batch_size, logprobs=5, max_tokens=args.max_tokens)
        reqs = [{"row_id": str(i), "messages": m, "seed": 0} for i, m in enumerate(msgs)]
        t0 = time.perf_counter()
        gens, _, v_s = fleet_answers(spec, reqs, max_tokens=args.max_tokens, num_cpus=2)
        v_total = time.perf_counter() - t0
        v_tok = sum(g["completion_tokens"] or 0 for g in gens.values())
        assert all(g.get("token_logprobs") for g in gens.values())

        import torch
        from transformers import AutoModelForCausalLM

        from datagen.train import student
        from datagen.train.evaluate import _generate

        tok = student.load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(student.resolve(path), dtype=torch.float32).eval()
        t0 = time.perf_counter()
        h_full = 0  # answers that ran to max_tokens (the rest stopped at EOS)
        for m in msgs:
            _, finish = _generate(model, tok, m, max_new_tokens=args.max_tokens, device="cpu")
            h_full += finish == "length"
        h_s = time.perf_counter() - t0

    v_rate, h_rate = args.rows / v_s, args.rows / h_s
    print(f"student: {path}; {args.rows} prompts, greedy, max_tokens {args.max_tokens}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"vLLM student actor : {v_rate:7.2f} rows/s  ({v_s:.1f} s; {v_tok} tokens; engine start and "
          f"teardown {v_total - v_s:.1f} s)")
    print(f"HF one at a time   : {h_rate:7.2f} rows/s  ({h_s:.1f} s; {h_full} answers at max_tokens)")
    print(f"ratio              : {v_rate / h_rate:.1f}x")


if __name__ == "__main__":
    main()
