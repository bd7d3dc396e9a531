"""Token strings -> token ids, for servers that name logprob tokens only by their text.

OpenAI's API (and vLLM's without ``return_tokens_as_token_ids``) gives each logprob
entry as a token string plus its UTF-8 ``bytes``. KD needs ids. When the job names the
teacher's tokenizer (``tokenizer:``), the bytes are looked up in its vocabulary.

Only byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen, SmolLM, GPT-NeoX, …) are
supported: there every vocabulary entry is its bytes spelled in a fixed 256-character
alphabet, so bytes -> id is an exact dictionary look-up. Anything else (SentencePiece
``▁`` vocabularies, byte fallback) is refused when the teacher starts, rather than
guessed. A token whose bytes are not exactly one vocabulary entry (two entries with
the same bytes, a partial character the server rendered as U+FFFD) maps to ``None``;
the caller then stores no ids for that row at all: ids are never invented.

Measured against vLLM's own server (tests/test_openai_vllm_server.py): it names a
token that is only part of a character (a byte piece of an emoji or an accent, common
among top-20 alternatives) as ``""`` with no bytes, so such rows stay null. Against a
vLLM server, ask for ids directly (``request_token_ids``); this map is for providers
that send the bytes (OpenAI's API does).
"""

from __future__ import annotations

import json
from typing import Any

from datagen.errors import ConfigError
from datagen.teachers.base import tokenizer_fingerprint


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(p.get("type") == "ByteLevel" for p in parts)


class TokenMap:
    def __init__(self, vocab: dict[str, int], *, special: dict[str, Any] | None = None):
        decode = {c: b for b, c in byte_alphabet().items()}
        by_bytes: dict[bytes, int | None] = {}
        for token, idx in vocab.items():
            try:
                key = bytes(decode[c] for c in token)
            except KeyError:  # an added token spelled outside the alphabet: its own text
                key = token.encode()
            by_bytes[key] = None if key in by_bytes else idx  # ambiguous -> no answer
        self._by_bytes = by_bytes
        self.fingerprint = tokenizer_fingerprint(vocab, special)

    @classmethod
    def load(cls, name: str, *, teacher: str) -> TokenMap:
        """From an HF folder, hub id or ``embedded:NAME``; a clear error otherwise."""
        from datagen.teachers import embedded

        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(f"teacher {teacher!r}: `tokenizer:` needs transformers (pip install 'datagen[cpu]')") from None
        where = str(embedded.materialize(name)) if embedded.is_embedded(name) else name
        try:
            tok = AutoTokenizer.from_pretrained(where)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"teacher {teacher!r}: cannot load tokenizer {name!r}: {str(exc).splitlines()[0][:200]}") from None
        if not _is_byte_level(tok):
            raise ConfigError(
                f"teacher {teacher!r}: tokenizer {name!r} is not a byte-level BPE tokenizer; mapping API "
                "token strings to ids is supported only for those (or use request_token_ids with a vLLM server)"
            )
        return cls(tok.get_vocab(), special=getattr(tok, "special_tokens_map", None))

    def id(self, token: str, raw: list[int] | None = None) -> int | None:
        """The id of one token, from its bytes when the server sent them, else its text."""
        try:
            key = bytes(raw) if raw is not None else token.encode()
        except (TypeError, ValueError):
            return None
        return self._by_bytes.get(key)
