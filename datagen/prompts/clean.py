"""Prompt-level cleaning before any teacher token is paid for: near-duplicate prompts
(MinHash from ``datagen.dedupe.minhash``, verified by exact Jaccard) and contamination with
user-provided eval sets (shared word n-grams).

Both look at ``compared_text``: the prompt's last user turn, the part that varies from
prompt to prompt; the system turn and worked examples are the same template text in every
prompt. The diversity report (``diversity.py``) measures the same text, so its figures and
prompt dedupe agree on what counts as a near-duplicate.

Not covered: an eval item shorter than ``ngram`` words has no n-gram and can never match
(lower ``decontaminate.ngram`` for short-answer evals); paraphrases that share no n-gram.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from datagen import records
from datagen.dedupe import minhash
from datagen.config import Decontaminate, PromptDedupe
from datagen.errors import ConfigError
from datagen.prompts.seeds import READERS, BadRow, source_format, where

# The same normalisation as dedupe: lower case, punctuation dropped, NFKC for non-ASCII.
_WORDS = minhash.Shingling(kind="word")


def compared_text(messages: list[dict[str, str]]) -> str:
    """The text a rendered prompt is compared on: its last (user) turn."""
    return messages[-1]["content"]


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
    near-duplicate of one of them (the earlier prompt is kept) and indexes it if not;
    ``check_many`` does the same for a batch, in order.

    Signatures come in batches (``signatures``), as ``minhash`` computes them in bulk;
    candidates are verified by the exact Jaccard of their shingle-hash sets, so only a
    pair at or above ``threshold`` counts.

    The index is compact because a plan may screen hundreds of thousands of seeds: per
    band, the keys of the prompts kept so far in a sorted numpy array (12 bytes a key,
    looked up for a whole batch at once), plus a dict of the few added since the last
    merge. A dict of ``(band, key)`` tuples cost ~200 bytes a key, 0.8 GB for 250k seeds
    at 16 bands, and slowed the garbage collector with millions of tracked objects."""

    MERGE_AT = 32768  # prompts indexed in the dicts before they move into the arrays

    def __init__(self, cfg: PromptDedupe):
        self.cfg = cfg
        self.shingling = minhash.Shingling(kind="word", n=cfg.ngram)
        self.a, self.b = minhash.permutations(cfg.num_perm, 1)
        # Recall-leaning weights, as the dataset dedupe uses: a missed pair is a duplicate
        # prompt paid for twice, a spare candidate costs one set intersection.
        self.bands, self.rows = minhash.lsh_params(cfg.threshold, cfg.num_perm, 0.05, 0.95)
        self.sets: list[np.ndarray] = []  # shingle-hash set of each indexed prompt
        self._keys = [np.empty(0, np.uint64) for _ in range(self.bands)]  # per band, sorted
        self._ids = [np.empty(0, np.int64) for _ in range(self.bands)]  # index of each key
        self._recent: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]
        self._recent_rows: list[tuple[list[int], int]] = []  # (keys, index) since the last merge

    def keys(self, texts: list[str]) -> np.ndarray:
        """(n, bands) band keys of ``texts``."""
        sig = minhash.signatures(texts, self.shingling, self.a, self.b)
        return minhash.band_keys(sig, self.bands, self.rows)

    def check(self, text: str, keys: Any) -> bool:
        keys = np.asarray(keys, dtype=np.uint64).reshape(1, -1)
        return self._check(text, keys[0].tolist(), self._merged_candidates(keys)[0])

    def check_many(self, texts: list[str], skip: list[bool] | None = None) -> list[bool | None]:
        """``check`` for each text in order (a text near an earlier one of the batch counts);
        texts where ``skip`` is true are neither checked nor indexed (None)."""
        keys = self.keys(texts)
        old = self._merged_candidates(keys)
        out: list[bool | None] = []
        for k, row in enumerate(keys.tolist()):
            out.append(None if skip is not None and skip[k] else self._check(texts[k], row, old[k]))
        if len(self._recent_rows) >= self.MERGE_AT:
            self._merge()
        return out

    def matches(self, texts: list[str]) -> list[bool]:
        """Whether each text is a near-duplicate of an indexed prompt; nothing is indexed
        (an eval set screened against training prompts: ``route/evalset.py``)."""
        keys = self.keys(texts)
        return [self._near(texts[k], row, cands) is None for k, (row, cands)
                in enumerate(zip(keys.tolist(), self._merged_candidates(keys)))]

    def _merged_candidates(self, keys: np.ndarray) -> list[set[int]]:
        """For each row of ``keys``: indexed prompts sharing a bucket, from the arrays."""
        found: list[set[int]] = [set() for _ in range(len(keys))]
        for band in range(self.bands):
            sk = self._keys[band]
            if not len(sk):
                continue
            q = keys[:, band]
            lo, hi = np.searchsorted(sk, q, side="left"), np.searchsorted(sk, q, side="right")
            for t in np.flatnonzero(hi > lo).tolist():
                found[t].update(self._ids[band][lo[t]:hi[t]].tolist())
        return found

    def _near(self, text: str, keys: list[int], candidates: set[int]) -> np.ndarray | None:
        """None when ``text`` is a near-duplicate of an indexed prompt, else its shingle hashes."""
        hashes = np.unique(minhash.shingle_hashes(text, self.shingling))
        for band, key in enumerate(keys):
            candidates.update(self._recent[band].get(key, ()))
        for j in sorted(candidates):
            other = self.sets[j]
            inter = len(np.intersect1d(hashes, other, assume_unique=True))
            union = len(hashes) + len(other) - inter
            if (inter / union if union else 1.0) >= self.cfg.threshold:
                return None
        return hashes

    def _check(self, text: str, keys: list[int], candidates: set[int]) -> bool:
        hashes = self._near(text, keys, candidates)
        if hashes is None:
            return True
        idx = len(self.sets)
        self.sets.append(hashes)
        for band, key in enumerate(keys):
            self._recent[band].setdefault(key, []).append(idx)
        self._recent_rows.append((keys, idx))
        return False

    def _merge(self) -> None:
        keys = np.array([k for k, _ in self._recent_rows], dtype=np.uint64)
        ids = np.array([i for _, i in self._recent_rows], dtype=np.int64)
        for band in range(self.bands):
            k = np.concatenate([self._keys[band], keys[:, band]])
            order = np.argsort(k, kind="stable")
            self._keys[band], self._ids[band] = k[order], np.concatenate([self._ids[band], ids])[order]
            self._recent[band] = {}
        self._recent_rows = []
