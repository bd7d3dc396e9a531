"""A teacher's answer to one request, as a row of the record schema (``records.SCHEMA``)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from datagen import records
from datagen.prompts import Request
from datagen.teachers.spec import Price


def make_row(req: Request, gen: dict[str, Any], info: dict[str, Any], sampling: dict[str, Any],
             license: dict[str, str], *, price: Price | None = None) -> dict[str, Any]:
    row = records.empty_row()
    row.update(
        row_id=req.row_id, prompt_id=req.prompt_id, sample_index=req.sample_index,
        messages=req.messages, response=gen["text"], finish_reason=gen["finish_reason"],
        teacher={k: info.get(k) for k in ("name", "backend", "model", "revision")},
        sampling={**sampling, "seed": req.seed},
        usage={"prompt_tokens": gen["prompt_tokens"], "completion_tokens": gen["completion_tokens"],
               "cost_usd": price.cost(gen["prompt_tokens"], gen["completion_tokens"]) if price else None},
        token_ids=gen["token_ids"], token_logprobs_q=records.quantize_logprobs(gen["token_logprobs"]),
        tokenizer_fingerprint=info.get("tokenizer_fingerprint"),
        provenance=req.provenance,
        license=license,
        timings={"generated_at": datetime.now(timezone.utc), "latency_s": gen["latency_s"],
                 "attempts": gen["attempts"]},
        error=gen["error"],
    )
    row["top_ids"], row["top_logprobs_q"] = records.encode_top(gen["top_ids"], gen["top_logprobs"])
    return row
