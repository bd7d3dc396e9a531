"""From committed shards to packed training batches, streaming.

    shards (manifest) -> select rows -> shuffle buffer -> encode (chat template, mask)
                      -> pack into seq_len rows -> batches of tensors

Memory is flat in dataset size: rows are read row group by row group
(``ShardStore.iter_rows``), and at most ``shuffle_buffer`` rows plus one batch are held.

Alignment. An encoded example stores *targets already shifted*: ``targets[j]`` is the
token position ``j`` must predict (``-100`` where no loss applies: the prompt, the last
position). KD targets sit on the same positions: ``kd[j]`` is the teacher's top-k for
the token at ``j + 1``. Because nothing needs shifting after packing, one document's
last position can never be trained to predict the next document's first token.

Packing. Whole examples are packed greedily into rows of ``seq_len`` tokens; each
example's ``position_ids`` restart at 0, which transformers turns into a block-diagonal
causal mask (``masking_utils.find_packed_sequence_indices``), so packed documents do not
attend to each other (tested). An example longer than ``seq_len`` is cut to fit.

Parts. With several workers each reads its own *part* of the committed rows: the
accepted shards' row groups, in manifest order, are dealt out round-robin (row group
``u`` goes to part ``u % parts``), and a worker opens only its own row groups. The parts
are disjoint and their union is the whole selection (tested); with one part the order is
exactly ``ShardStore.iter_rows``'s. Parts are as balanced as the row groups are. A store
with fewer row groups than parts (a small one: fewer than ``parts x row_group_rows`` rows)
is dealt out row by row instead, each part reading the whole (small) store.

Determinism. The batch stream is a pure function of (data, config, seed): resume replays
it and skips the batches already consumed, so a resumed run sees exactly the batches an
uninterrupted one would. Replay costs tokenisation time only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from datagen import records
from datagen.errors import DatagenError
from datagen.licenses import CLASSES, Registry
from datagen.storage import open_store
from datagen.train.config import Data

IGNORE = -100


class DataError(DatagenError):
    """The shards cannot be trained on as configured."""


# --------------------------------------------------------------------------- KD columns


@dataclass
class KD:
    """The teacher's signal for one row, one entry per generated token."""

    token_ids: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]  # natural-log probabilities, raw (before temperature)
    fingerprint: str | None


def read_kd(row: dict[str, Any]) -> KD | None:
    """The ONE place that reads the KD columns of a row (``token_ids``, ``top_ids``,
    ``top_logprobs_q``, ``tokenizer_fingerprint``). The log-probs are stored quantised
    (``records.encode_top``: delta-coded uint16) and decoded here to floats.
    ``None``: no KD signal."""
    ids, top_ids, top_q = row.get("token_ids"), row.get("top_ids"), row.get("top_logprobs_q")
    if not ids or top_ids is None or top_q is None:
        return None
    if not (len(ids) == len(top_ids) == len(top_q)):
        raise DataError(f"row {row.get('row_id')}: token_ids, top_ids and top_logprobs_q differ in length "
                        f"({len(ids)}, {len(top_ids)}, {len(top_q)})")
    top_lps = [lp.tolist() for lp in records.decode_top(top_q)]
    return KD(list(ids), [list(t) for t in top_ids], top_lps, row.get("tokenizer_fingerprint"))


# --------------------------------------------------------------------------- selection


def is_heldout(prompt_id: str, fraction: float) -> bool:
    """A stable split by prompt (all samples of a prompt fall on one side), shared by
    ``datagen train`` (which skips held-out prompts) and ``datagen eval`` (which uses only them)."""
    if fraction <= 0:
        return False
    bucket = int(records.content_hash({"holdout": prompt_id}, size=8), 16) / 2**64
    return bucket < fraction


def part_rows(store: Any, *, part: int = 0, parts: int = 1, batch_rows: int = 256) -> Iterator[dict[str, Any]]:
    """The committed accepted rows of data part ``part`` of ``parts`` (see Parts)."""
    fs = store.manifest.filesystem
    files = store.manifest.files("accepted")
    if parts > 1 and sum(pq.ParquetFile(p, filesystem=fs).num_row_groups for p in files) < parts:
        # Fewer row groups than parts: a small store, dealt out row by row (each part reads it all).
        for i, row in enumerate(r for p in files for b in pq.ParquetFile(p, filesystem=fs).iter_batches(
                batch_size=batch_rows) for r in b.to_pylist()):
            if i % parts == part:
                yield row
        return
    unit = 0
    for path in files:
        pf = pq.ParquetFile(path, filesystem=fs)
        mine = [rg for rg in range(pf.num_row_groups) if (unit + rg) % parts == part]
        unit += pf.num_row_groups
        if mine:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=mine):
                yield from batch.to_pylist()


def select_rows(data: Data, *, split: str, part: int = 0, parts: int = 1) -> Iterator[dict[str, Any]]:
    """Committed accepted rows of ``split`` ("train" or "heldout") that pass the selection,
    from data part ``part`` of ``parts``."""
    store = open_store(data.path)
    registry = Registry.for_job((store.job_meta().get("job") or {})) if data.license_class else None
    n = 0
    for row in part_rows(store, part=part, parts=parts):
        if is_heldout(row["prompt_id"], data.holdout_fraction) != (split == "heldout"):
            continue
        if data.teachers and (row.get("teacher") or {}).get("name") not in data.teachers:
            continue
        if registry is not None and \
                CLASSES.index(registry.row_class(row.get("license") or {})) > CLASSES.index(data.license_class):
            continue
        if data.min_score and not _scores_ok(row, data.min_score):
            continue
        yield row
        n += 1
        if data.max_rows is not None and n >= data.max_rows:
            return


def _scores_ok(row: dict[str, Any], min_score: dict[str, float]) -> bool:
    scores = {v["filter"]: v["score"] for v in row.get("verdicts") or [] if v.get("score") is not None}
    return all(name in scores and scores[name] >= lo for name, lo in min_score.items())


# --------------------------------------------------------------------------- encoding


@dataclass
class Example:
    input_ids: list[int]
    targets: list[int]  # shifted: targets[j] is predicted at position j; IGNORE = no loss
    kd: list[tuple[list[int], list[float]] | None] = field(default_factory=list)  # per position


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the student's tokenizer has no chat template; give it one (tokenizer_config.json)")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    # transformers 5 may still hand back a BatchEncoding
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class Encoder:
    """Row -> Example with the student's chat template.

    With KD (``use_kd``), the completion is the teacher's own token ids, so the stored
    top-k at generated token ``i`` lines up with the student's prediction of token ``i``;
    this needs the same tokenizer, checked by fingerprint on every row. Without KD the
    completion is the response text re-tokenised by the student, plus its EOS token.
    """

    def __init__(self, tokenizer: Any, *, fingerprint: str, use_kd: bool, seq_len: int):
        self.tok, self.fingerprint, self.use_kd, self.seq_len = tokenizer, fingerprint, use_kd, seq_len
        self.skipped = 0  # rows whose prompt alone fills seq_len

    def completion(self, row: dict[str, Any], kd: KD | None) -> list[int]:
        if kd is not None and kd.fingerprint == self.fingerprint:
            return kd.token_ids
        ids = self.tok(row.get("response") or "", add_special_tokens=False)["input_ids"]
        return list(ids) + ([self.tok.eos_token_id] if self.tok.eos_token_id is not None else [])

    def __call__(self, row: dict[str, Any]) -> Example | None:
        kd = read_kd(row)
        if self.use_kd:
            if kd is None:
                raise DataError(f"row {row['row_id']} has no teacher logprobs (its teacher gave none); "
                                "KD needs them: set loss.kd_weight: 0 to train on the text only")
            if kd.fingerprint != self.fingerprint:
                teacher = (row.get("teacher") or {}).get("name")
                raise DataError(
                    f"row {row['row_id']} (teacher {teacher!r}) was tokenized with {kd.fingerprint}, the "
                    f"student's tokenizer is {self.fingerprint}: KD needs the teacher's tokenizer; use a "
                    "student built on it (init: prune, or its tokenizer) or set loss.kd_weight: 0")
        prompt = prompt_ids(self.tok, row["messages"])
        comp = self.completion(row, kd)
        room = self.seq_len - len(prompt)
        if room < 2:
            self.skipped += 1
            return None
        comp = comp[:room]
        ids = prompt + comp
        # position len(prompt)-1+i predicts completion token i
        targets = [IGNORE] * (len(prompt) - 1) + comp + [IGNORE]
        kd_pos: list[tuple[list[int], list[float]] | None] = [None] * len(ids)
        if self.use_kd:
            for i in range(len(comp)):
                kd_pos[len(prompt) - 1 + i] = (kd.top_ids[i], kd.top_logprobs[i])
        return Example(ids, targets, kd_pos)


# --------------------------------------------------------------------------- shuffle, pack, batch


def shuffled(rows: Iterator[dict[str, Any]], *, buffer: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """A bounded shuffle: memory ``buffer`` rows, order a function of the seed."""
    buf: list[dict[str, Any]] = []
    for row in rows:
        buf.append(row)
        if len(buf) >= buffer:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def pack(examples: Iterator[Example], *, seq_len: int, pad_id: int) -> Iterator[dict[str, list]]:
    """Greedy packing of whole examples into rows of exactly ``seq_len`` tokens."""
    cur: dict[str, list] = {"input_ids": [], "targets": [], "position_ids": [], "kd": []}

    def flush() -> dict[str, list]:
        out = dict(cur)
        pad = seq_len - len(out["input_ids"])
        out["input_ids"] = out["input_ids"] + [pad_id] * pad
        out["targets"] = out["targets"] + [IGNORE] * pad
        out["position_ids"] = out["position_ids"] + list(range(pad))  # its own "document"
        out["kd"] = out["kd"] + [None] * pad
        out["real"] = seq_len - pad
        return out

    for ex in examples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex.input_ids) > seq_len:
            yield flush()
            cur = {"input_ids": [], "targets": [], "position_ids": [], "kd": []}
        cur["input_ids"] += ex.input_ids
        cur["targets"] += ex.targets
        cur["position_ids"] += list(range(len(ex.input_ids)))
        cur["kd"] += ex.kd
    if cur["input_ids"]:
        yield flush()


def collate(packs: list[dict[str, list]], *, k: int) -> dict[str, Any]:
    """Packed rows -> tensors. KD top-k lists shorter than ``k`` are padded and masked."""
    import torch

    b, t = len(packs), len(packs[0]["input_ids"])
    top_ids = torch.zeros(b, t, k, dtype=torch.long)
    top_lp = torch.zeros(b, t, k, dtype=torch.float32)
    top_ok = torch.zeros(b, t, k, dtype=torch.bool)
    for bi, p in enumerate(packs):
        for ti, entry in enumerate(p["kd"]):
            if entry is not None:
                ids, lps = entry
                n = min(len(ids), k)
                top_ids[bi, ti, :n] = torch.tensor(ids[:n])
                top_lp[bi, ti, :n] = torch.tensor(lps[:n])
                top_ok[bi, ti, :n] = True
    return {
        "input_ids": torch.tensor([p["input_ids"] for p in packs]),
        "position_ids": torch.tensor([p["position_ids"] for p in packs]),
        "targets": torch.tensor([p["targets"] for p in packs]),
        "top_ids": top_ids, "top_logprobs": top_lp, "top_mask": top_ok,
        "tokens": sum(p.get("real", 0) for p in packs),  # real tokens, padding not counted
    }


def kd_width(data: Data) -> int:
    """The widest top-k in the selected rows' first shard entries (for tensor shapes)."""
    for row in select_rows(data, split="train"):
        kd = read_kd(row)
        return max((len(t) for t in kd.top_ids), default=1) if kd else 1
    return 1


def packed_rows(data: Data, encoder: Encoder, *, seq_len: int, pad_id: int, buffer: int, seed: int,
                part: int = 0, parts: int = 1) -> Iterator[dict[str, list]]:
    """Endless packed rows of data part ``part`` of ``parts``, epoch after epoch; epoch ``e``
    shuffles with seed ``(seed, e)`` (and the part, when there are several)."""
    epoch = 0
    while True:
        rng = random.Random(f"{seed}:{epoch}" if parts == 1 else f"{seed}:{epoch}:{part}/{parts}")
        rows = shuffled(select_rows(data, split="train", part=part, parts=parts), buffer=buffer, rng=rng)
        examples = (ex for ex in map(encoder, rows) if ex is not None)
        produced = False
        for p in pack(examples, seq_len=seq_len, pad_id=pad_id):
            produced = True
            yield p
        if not produced:
            where = f" in data part {part} of {parts} (fewer rows than workers?)" if parts > 1 else ""
            raise DataError(f"{data.path}: no training rows after selection{where} (accepted rows, minus the "
                            f"held-out fraction {data.holdout_fraction}, minus rows longer than seq_len)")
        epoch += 1


def batches(data: Data, encoder: Encoder, *, batch_size: int, seq_len: int, pad_id: int,
            buffer: int, seed: int, k: int, part: int = 0, parts: int = 1) -> Iterator[dict[str, Any]]:
    """Endless batches of ``batch_size`` packed rows. A batch may straddle two epochs: no
    padding rows at an epoch's end, so ``batch_size: 4`` and ``2 x grad_accum: 2`` cut the
    same rows into the same steps."""
    group: list[dict[str, list]] = []
    for p in packed_rows(data, encoder, seq_len=seq_len, pad_id=pad_id, buffer=buffer, seed=seed,
                         part=part, parts=parts):
        group.append(p)
        if len(group) == batch_size:
            yield collate(group, k=k)
            group = []
