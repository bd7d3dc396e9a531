"""The OpenAI Batch API on ``FakeOpenAIServer``: ``/v1/files`` (multipart upload with
``purpose=batch``, ``GET /files/ID/content``) and ``/v1/batches`` (create, retrieve,
list, cancel), answering each input line with the server's own chat completion, so a
batch answer equals the online one for the same request.

A batch completes at the first status check once ``seconds`` (default 0) have passed
since it was created. Faults are queued as on the server (``server.batches.inject(kind,
times=1, match=None, seconds=0.0)``), taken by the next upload (``upload_400``), the
next status check (``status_500``) or the next batch created (the rest):

``upload_400``        the file upload is refused with 400, as a provider refuses a bad file
``status_500``        a status check (retrieve) answers 500, as a provider having a bad minute
``slow``              the batch stays ``in_progress`` for ``seconds``
``hold``              the batch stays ``in_progress`` until cancelled
``expire``            the batch expires with only the first half of its lines answered
``failed_lines``      lines whose last message contains ``match`` get a 500 in the error file
``malformed_output``  the output file's last line is replaced by garbage
``fail``              the whole batch fails validation (``errors``, no output)

``calls`` counts every call by kind (``upload``, ``create``, ``retrieve``, ``list``,
``cancel``, ``content``); ``lines`` counts input lines submitted over all batches: a
resumed driver that re-submitted would show in both. Not covered: the 24 h window
(a batch expires only by the ``expire`` fault), ``/v1/responses`` and embeddings lines.
"""

from __future__ import annotations

import email.parser
import json
import time
from collections import Counter
from typing import Any

from datagen.testing.faults import Fault, take

BATCH_FAULTS = ("upload_400", "status_500", "slow", "hold", "expire", "failed_lines", "malformed_output", "fail")


class FakeBatches:
    def __init__(self, server: Any):
        self.server = server  # the FakeOpenAIServer: its completion() answers each line
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._plans: dict[str, tuple[Fault | None, float]] = {}  # batch id -> (fault, created)
        self._faults: list[Fault] = []
        self.calls: Counter = Counter()
        self.lines = 0

    def inject(self, kind: str, *, times: int | None = 1, match: str | None = None, seconds: float = 0.0) -> None:
        if kind not in BATCH_FAULTS:
            raise ValueError(f"unknown batch fault {kind!r}; known: {', '.join(BATCH_FAULTS)}")
        with self.server._lock:
            self._faults.append(Fault(kind, times, match, seconds))

    def _take(self, upload: bool = False, status: bool = False) -> Fault | None:
        """The next fault for an upload, a status check, or (neither) a batch created."""
        def applies(f: Fault) -> bool:
            return (f.kind == "upload_400") == upload and (f.kind == "status_500") == status

        with self.server._lock:
            return take(self._faults, applies)

    # -- HTTP --------------------------------------------------------------------------
    def handle(self, h: Any, method: str, path: str, data: bytes) -> None:
        parts = path.split("/v1/", 1)[-1].split("/")
        if parts[0] == "files":
            if method == "POST" and len(parts) == 1:
                return self._upload(h, data)
            if method == "GET" and len(parts) == 3 and parts[2] == "content" and parts[1] in self.files:
                self.calls["content"] += 1
                return h.raw(200, self.files[parts[1]])
        elif parts[0] == "batches":
            if method == "POST" and len(parts) == 1:
                return self._create(h, json.loads(data or b"{}"))
            if method == "GET" and len(parts) == 1:
                self.calls["list"] += 1
                listed = [self._status(b) for b in reversed(self.batches.values())]
                return h._json(200, {"object": "list", "data": listed, "has_more": False,
                                     "first_id": listed[0]["id"] if listed else None,
                                     "last_id": listed[-1]["id"] if listed else None})
            if len(parts) >= 2 and parts[1] in self.batches:
                b = self.batches[parts[1]]
                if method == "GET" and len(parts) == 2:
                    self.calls["retrieve"] += 1
                    if self._take(status=True) is not None:
                        return h._json(500, {"error": {"message": "injected status failure", "type": "server_error"}})
                    return h._json(200, self._status(b))
                if method == "POST" and parts[2:] == ["cancel"]:
                    self.calls["cancel"] += 1
                    if b["status"] not in ("completed", "failed", "expired", "cancelled"):
                        b["status"], b["cancelling_at"] = "cancelling", int(time.time())
                    return h._json(200, b)
        h._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def _upload(self, h: Any, data: bytes) -> None:
        self.calls["upload"] += 1
        fields = _multipart(h.headers.get("content-type", ""), data)
        fault = self._take(upload=True)
        if fault is not None or fields.get("purpose") != b"batch" or "file" not in fields:
            why = "injected: invalid batch input file" if fault else "expected purpose=batch and a file"
            return h._json(400, {"error": {"message": why, "type": "invalid_request_error"}})
        fid = f"file-{len(self.files) + 1}"
        self.files[fid] = fields["file"]
        h._json(200, {"id": fid, "object": "file", "bytes": len(fields["file"]), "created_at": int(time.time()),
                      "filename": "input.jsonl", "purpose": "batch", "status": "processed"})

    def _create(self, h: Any, body: dict[str, Any]) -> None:
        self.calls["create"] += 1
        source = self.files.get(body.get("input_file_id"))
        if source is None:
            return h._json(400, {"error": {"message": "no such input file", "type": "invalid_request_error"}})
        bid = f"batch_{len(self.batches) + 1}"
        n = sum(1 for line in source.splitlines() if line.strip())
        self.lines += n
        now = int(time.time())
        self.batches[bid] = {
            "id": bid, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
            "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window", "24h"),
            "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now,
            "in_progress_at": None, "expires_at": now + 86400, "finalizing_at": None, "completed_at": None,
            "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": n, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
        }
        self._plans[bid] = (self._take(), time.monotonic())
        h._json(200, self.batches[bid])

    # -- a batch's life ----------------------------------------------------------------
    def _status(self, b: dict[str, Any]) -> dict[str, Any]:
        fault, created = self._plans[b["id"]]
        kind = fault.kind if fault else None
        if b["status"] == "cancelling":
            self._finish(b, fault, answer_first=0, status="cancelled")
        elif b["status"] in ("validating", "in_progress"):
            b["status"], b["in_progress_at"] = "in_progress", b["in_progress_at"] or int(time.time())
            waited = time.monotonic() - created
            if kind == "hold" or (kind == "slow" and waited < fault.seconds):
                return b
            if kind == "fail":
                b["status"], b["failed_at"] = "failed", int(time.time())
                b["errors"] = {"object": "list", "data": [{"code": "invalid_request", "message": "injected: failed",
                                                           "line": None, "param": None}]}
            else:
                total = b["request_counts"]["total"]
                self._finish(b, fault, answer_first=total // 2 if kind == "expire" else total,
                             status="expired" if kind == "expire" else "completed")
        return b

    def _finish(self, b: dict[str, Any], fault: Fault | None, *, answer_first: int, status: str) -> None:
        """Answer the first ``answer_first`` lines, write the output and error files."""
        out, err = [], []
        lines = [json.loads(x) for x in self.files[b["input_file_id"]].splitlines() if x.strip()]
        for i, line in enumerate(lines[:answer_first]):
            body = line["body"]
            last = str((body.get("messages") or [{}])[-1].get("content", ""))
            rec = {"id": f"batch_req_{b['id']}_{i}", "custom_id": line["custom_id"], "error": None}
            if fault is not None and fault.kind == "failed_lines" and fault.match and fault.match in last:
                rec["response"] = {"status_code": 500, "request_id": f"req_{i}",
                                   "body": {"error": {"message": "injected line failure", "type": "server_error"}}}
                err.append(rec)
            else:
                rec["response"] = {"status_code": 200, "request_id": f"req_{i}", "body": self.server.completion(body)}
                out.append(rec)
        text = [json.dumps(r) for r in out]
        if fault is not None and fault.kind == "malformed_output" and text:
            text[-1] = '{"custom_id": <html>502'
        now = int(time.time())
        if text:
            b["output_file_id"] = self._store("\n".join(text) + "\n")
        if err:
            b["error_file_id"] = self._store("\n".join(json.dumps(r) for r in err) + "\n")
        b["status"] = status
        b[{"completed": "completed_at", "expired": "expired_at", "cancelled": "cancelled_at"}[status]] = now
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}

    def _store(self, text: str) -> str:
        fid = f"file-{len(self.files) + 1}"
        self.files[fid] = text.encode()
        return fid


def _multipart(content_type: str, data: bytes) -> dict[str, bytes]:
    """The fields of a multipart/form-data body, by name."""
    msg = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + data)
    fields = {}
    for part in msg.get_payload() if msg.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[name] = part.get_payload(decode=True)
    return fields
