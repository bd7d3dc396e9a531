"""A request as a batch input line, and a provider's output and error files read back.

Input lines are the OpenAI Batch API's, which vLLM's ``run_batch`` also reads:
``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``. The
``custom_id`` is the row id and the body is what an online call POSTs
(``openai_api.chat_body``), so rows keep online mode's ids and every line maps back to
its row with no other state. Output and error lines are
``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
"error": {"code", "message"} | null}``. Not covered: endpoints other than chat completions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from datagen.prompts import Request
from datagen.teachers.openai_api import chat_body
from datagen.teachers.spec import OpenAITeacher

ENDPOINT = "/v1/chat/completions"


def request_line(cfg: OpenAITeacher, req: Request) -> bytes:
    body = chat_body(cfg, {"messages": req.messages, "seed": req.seed})
    line = {"custom_id": req.row_id, "method": "POST", "url": ENDPOINT, "body": body}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


@dataclass
class Outcome:
    """What a provider said about one row: a completion body, or why there is none."""

    body: dict[str, Any] | None = None
    error: str | None = None  # "code: message"
    retry: bool = False  # worth submitting again (429, 5xx, a line the provider dropped)


def read_results(text: str) -> tuple[dict[str, Outcome], int]:
    """``custom_id -> Outcome`` over the lines of an output or error file, and how many
    lines could not be read (not JSON, no ``custom_id``, neither response nor error).
    A row's answer wins over an error line for it."""
    out: dict[str, Outcome] = {}
    bad = 0
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except (ValueError, RecursionError):
            bad += 1
            continue
        outcome = _outcome(line) if isinstance(line, dict) and isinstance(line.get("custom_id"), str) else None
        if outcome is None:
            bad += 1
            continue
        rid = line["custom_id"]
        if rid not in out or out[rid].body is None:
            out[rid] = outcome
    return out, bad


def _outcome(line: dict[str, Any]) -> Outcome | None:
    response, error = line.get("response"), line.get("error")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        status, body = response["status_code"], response.get("body")
        if status == 200 and isinstance(body, dict):
            return Outcome(body=body)
        message = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(
            body.get("error"), dict) else None
        return Outcome(error=f"teacher.http_{status}: {message or 'no message'}",
                       retry=status in (408, 429) or status >= 500)
    if isinstance(error, dict):
        return Outcome(error=f"batch.{error.get('code') or 'error'}: {error.get('message') or 'no message'}",
                       retry=True)
    return None
