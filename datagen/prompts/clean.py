"""Prompt-level cleaning before any teacher token is paid for: near-duplicate prompts
(MinHash from ``datagen.minhash``, verified by exact Jaccard) and contamination with
user-provided eval sets (shared word n-grams).

Both look at the prompt's last user turn, the part that varies from prompt to prompt;
the system turn and worked examples are the same template text in every prompt.

Not covered: an eval item shorter than ``ngram`` words has no n-gram and can never match
(lower ``decontaminate.ngram`` for short-answer evals); paraphrases that share no n-gram.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datagen import minhash, records
from datagen.config import Decontaminate, PromptDedupe
from datagen.errors import ConfigError
from datagen.prompts.seeds import READERS, BadRow, source_format, where

# The same normalisation as dedupe: lower case, punctuation dropped, NFKC for non-ASCII.
_WORDS = minhash.Shingling(kind="word")


def ngrams(text: str, n: int) -> set[str]:
    words = _WORDS.words(text)
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


class Decontaminator:
    """Word n-grams of every eval set; ``hit(text)`` names the first set a prompt overlaps."""

    def __init__(self, cfg: Decontaminate):
        self.n = cfg.ngram
        self.sets: dict[str, set[str]] = {}
        digests = {}
        for ev in cfg.evals:
            texts = _eval_texts(ev.path, ev.format, ev.field)
            grams: set[str] = set()
            for t in texts:
                grams |= ngrams(t, self.n)
            self.sets[ev.name] = grams
            digests[ev.name] = records.content_hash(texts)
        self.digest = records.content_hash({"ngram": self.n, "evals": digests})

    def hit(self, text: str) -> str | None:
        grams = ngrams(text, self.n)
        for name, eval_grams in self.sets.items():
            if not grams.isdisjoint(eval_grams):
                return name
        return None


def _eval_texts(path: Path, fmt: str, field: str) -> list[str]:
    fmt = source_format(path, fmt)
    out = []
    for n, row in READERS[fmt](path):
        if isinstance(row, BadRow):
            raise ConfigError(f"{where(path, fmt, n)}: {row}")
        value = row.get(field)
        if not isinstance(value, str):
            raise ConfigError(f"{where(path, fmt, n)}: eval item has no text field {field!r}")
        out.append(value)
    if not out:
        raise ConfigError(f"{path}: the eval set is empty")
    return out


class NearDuplicates:
    """An LSH index of the prompts kept so far. ``check`` tells whether a new prompt is a
    near-duplicate of one of them (the earlier prompt is kept) and indexes it if not.

    Signatures come in batches (``signatures``), as ``minhash`` computes them in bulk;
    candidates are verified by the exact Jaccard of their shingle-hash sets, so only a
    pair at or above ``threshold`` counts."""

    def __init__(self, cfg: PromptDedupe):
        self.cfg = cfg
        self.shingling = minhash.Shingling(kind="word", n=cfg.ngram)
        self.a, self.b = minhash.permutations(cfg.num_perm, 1)
        # Recall-leaning weights, as the dataset dedupe uses: a missed pair is a duplicate
        # prompt paid for twice, a spare candidate costs one set intersection.
        self.bands, self.rows = minhash.lsh_params(cfg.threshold, cfg.num_perm, 0.05, 0.95)
        self.buckets: dict[tuple[int, int], list[int]] = {}
        self.sets: list[np.ndarray] = []

    def keys(self, texts: list[str]) -> list[list[int]]:
        sig = minhash.signatures(texts, self.shingling, self.a, self.b)
        return minhash.band_keys(sig, self.bands, self.rows).tolist()

    def check(self, text: str, keys: list[int]) -> bool:
        hashes = np.unique(minhash.shingle_hashes(text, self.shingling))
        tried: set[int] = set()
        for band, key in enumerate(keys):
            for j in self.buckets.get((band, key), ()):
                if j in tried:
                    continue
                tried.add(j)
                other = self.sets[j]
                inter = len(np.intersect1d(hashes, other, assume_unique=True))
                union = len(hashes) + len(other) - inter
                if (inter / union if union else 1.0) >= self.cfg.threshold:
                    return True
        idx = len(self.sets)
        self.sets.append(hashes)
        for band, key in enumerate(keys):
            self.buckets.setdefault((band, key), []).append(idx)
        return False
