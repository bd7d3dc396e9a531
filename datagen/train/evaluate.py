"""``datagen eval``: students against the teacher, on the prompts training held out.

Held-out rows are the accepted rows whose prompt falls in ``data.holdout_fraction`` (the
same hash split training skips). For each student, on those rows:

- ``answer_agreement``: the student answers greedily; the fraction of rows whose *final
  answer* equals the teacher's (a JSON answer compared as canonical JSON, else the last
  non-empty line, case- and punctuation-folded);
- ``token_kl``: mean per-token KL(teacher top-k || student) on the teacher's own tokens,
  the KD loss at temperature 1 (only where rows have logprobs and the tokenizer matches);
- ``perplexity``: exp of the student's mean per-token NLL of the teacher's answer text;
- ``verifier_pass``: the share of the student's answers that pass the configured filters
  (``datagen.filters.FilterChain``), when ``verifier`` is set.

The teacher's own column shows its perplexity on the tokens it sampled (from the stored
``token_logprobs_q``, raw, temperature 1) and its verifier pass rate on the same rows.
Greedy decoding one prompt at a time: simple and deterministic, not fast.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from rich.console import Console
from rich.table import Table

from datagen import records
from datagen.errors import DatagenError
from datagen.storage.shards import atomic_write_text
from datagen.train import data, student
from datagen.train.config import EvalConfig, Verifier
from datagen.train.trainer import forward_losses, pick_device

METRICS = ("answer_agreement", "token_kl", "perplexity", "verifier_pass")


def final_answer(text: str) -> str:
    text = (text or "").strip()
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        try:
            return json.dumps(json.loads(text[start:end + 1]), sort_keys=True)
        except (json.JSONDecodeError, RecursionError):
            pass
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return re.sub(r"[^\w]+", " ", lines[-1].lower()).strip() if lines else ""


def _verifier(v: Verifier | None):
    if v is None:
        return None
    from datagen.filters import FILTERS, FilterChain

    unknown = [n for n in v.filters if n not in FILTERS]
    if unknown:
        raise DatagenError(f"verifier.filters: unknown filter {unknown[0]!r} (known: {', '.join(FILTERS)})")
    chain = FilterChain(list(v.filters), v.answer)
    return lambda row: all(verdict.keep for verdict in chain(row))


def _generate(model: Any, tok: Any, messages: list[dict[str, str]], *, max_new_tokens: int,
              device: str) -> tuple[str, str]:
    import torch

    ids = torch.tensor([data.prompt_ids(tok, messages)], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    finish = "stop" if new and new[-1] == tok.eos_token_id else "length"
    return tok.decode(new, skip_special_tokens=True), finish


def load_model(path: str, device: str) -> tuple[Any, Any]:
    """(model in eval mode, float32, on ``device``; its tokenizer) from a model folder."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = student.load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(student.resolve(path), dtype=torch.float32).to(device).eval()
    return model, tok


def teacher_forced(model: Any, enc: data.Encoder, row: dict[str, Any], *, k: int, device: str,
                   use_kd: bool = True, divergence: str = "forward") -> tuple[Any, Any]:
    """One row's answer read by ``model``, teacher-forced: (per-token CE, per-position KL to
    the row's top-``k``, or None). One row at a time, unpadded; not covered: batching."""
    import torch

    ex = enc(row)
    batch = data.collate(list(data.pack(iter([ex]), seq_len=len(ex.input_ids), pad_id=0)), k=k)
    with torch.no_grad():
        ce, kl, _ = forward_losses(model, batch, device=device, use_kd=use_kd, divergence=divergence)
    return ce, kl


def score_student(path: str, rows: list[dict[str, Any]], cfg: EvalConfig, device: str,
                  passes: Any) -> dict[str, Any]:
    model, tok = load_model(path, device)
    fp = student.fingerprint(tok)
    kds = [data.read_kd(r) for r in rows]
    use_kd = all(kd is not None and kd.fingerprint == fp for kd in kds)
    enc = data.Encoder(tok, fingerprint=fp, use_kd=use_kd, seq_len=1 << 20)
    nll = n_tok = kl = n_kl = agree = passed = 0.0
    for row, row_kd in zip(rows, kds):
        k = max((len(t) for t in row_kd.top_ids), default=1) if use_kd else 1
        ce, kd = teacher_forced(model, enc, row, k=k, device=device, use_kd=use_kd)
        nll, n_tok = nll + ce.sum().item(), n_tok + ce.numel()
        if kd is not None:
            kl, n_kl = kl + kd.sum().item(), n_kl + kd.numel()
        text, finish = _generate(model, tok, row["messages"], max_new_tokens=cfg.max_new_tokens, device=device)
        agree += final_answer(text) == final_answer(row.get("response") or "")
        if passes is not None:
            passed += passes({**row, "response": text, "finish_reason": finish,
                              "sampling": {**(row.get("sampling") or {}), "max_tokens": cfg.max_new_tokens}})
    n = len(rows)
    return {
        "path": path, "params": sum(p.numel() for p in model.parameters()),
        "answer_agreement": agree / n,
        "token_kl": kl / n_kl if n_kl else None,
        "perplexity": math.exp(nll / n_tok),
        "verifier_pass": passed / n if passes is not None else None,
    }


def evaluate(cfg: EvalConfig, *, console: Console | None = None) -> dict[str, Any]:
    console = console or Console(stderr=True, quiet=True)
    device = pick_device(cfg.device)
    rows = []
    for row in data.select_rows(cfg.data, split="heldout"):
        rows.append(row)
        if len(rows) >= cfg.max_rows:
            break
    if not rows:
        raise DatagenError(f"{cfg.data.path}: no held-out rows (data.holdout_fraction is "
                           f"{cfg.data.holdout_fraction}; it must match the one training used, and be > 0)")
    passes = _verifier(cfg.verifier)
    lps = [float(lp) for r in rows if r.get("token_logprobs_q")
           for lp in records.dequantize_logprobs(r["token_logprobs_q"])]
    report: dict[str, Any] = {
        "data": str(cfg.data.path), "rows": len(rows), "holdout_fraction": cfg.data.holdout_fraction,
        "teacher": {
            "answer_agreement": 1.0, "token_kl": 0.0 if lps else None,
            "perplexity": math.exp(-sum(lps) / len(lps)) if lps else None,
            "verifier_pass": sum(passes(r) for r in rows) / len(rows) if passes is not None else None,
        },
        "students": {},
    }
    for label, path in cfg.students.items():
        console.print(f"scoring {label} ({path}) on {len(rows)} held-out rows…", highlight=False)
        report["students"][label] = score_student(path, rows, cfg, device, passes)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.output, json.dumps(report, indent=1))
    return report


def table(report: dict[str, Any]) -> Table:
    t = Table(title=f"datagen eval: {report['rows']} held-out rows of {report['data']}", header_style="bold")
    t.add_column("metric")
    t.add_column("teacher", justify="right")
    for label in report["students"]:
        t.add_column(label, justify="right")
    for m in METRICS:
        cells = [report["teacher"].get(m)] + [s.get(m) for s in report["students"].values()]
        t.add_row(m, *("n/a" if c is None else f"{c:.4g}" for c in cells))
    return t
