"""`datagen dedupe` over a real store: clusters, the kept rule, a verifiable view, and
the source shards left untouched."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from datagen.config import Output
from datagen.storage.shards import ShardStore

from .conftest import datagen
from .test_minhash import corpus
from .test_shards import META, row


def _store(tmp_path, ids, texts):
    store = ShardStore.create(tmp_path / "o", Output(path=tmp_path / "o", shard_rows=100), job_meta=META)
    for rid, text in zip(ids, texts):
        store.add("accepted", row(0, row_id=rid, response=text))
    store.commit_all()
    store.close()
    return tmp_path / "o"


def test_dedupe_writes_a_view_of_cluster_minima(tmp_path):
    ids, texts = corpus(60, 2, seed=11)
    # shuffle the storage order: the result must not depend on it
    order = sorted(range(len(ids)), key=lambda i: texts[i])
    src = _store(tmp_path, [ids[i] for i in order], [texts[i] for i in order])
    before = {s["file"]: s["sha256"] for s in ShardStore.open(src).manifest.shards}

    res = datagen("dedupe", str(src), "--workers", "1")
    assert res.returncode == 0, res.stderr
    view = src / "dedupe"
    clusters = pq.read_table(view / "clusters.parquet").to_pylist()
    assert sorted(c["row_id"] for c in clusters) == sorted(ids)
    members: dict[str, list[str]] = {}
    for c in clusters:
        members.setdefault(c["cluster"], []).append(c["row_id"])
    for cid, rows in members.items():
        assert cid == min(rows)  # the keep rule: smallest row id
    kept = ShardStore.open(view).read("accepted").to_pylist()
    assert sorted(r["row_id"] for r in kept) == sorted(members)
    assert len(kept) < len(ids)
    for r in kept:
        assert (r["dedupe_cluster"] is None) == (len(members[r["row_id"]]) == 1)
    report = json.loads((view / "report.json").read_text())
    assert report["kept"] == len(kept) and report["rows"] == len(ids)
    assert sum(int(k) * v for k, v in report["cluster_sizes"].items()) == len(ids)
    assert report["params"]["bands"] * report["params"]["rows_per_band"] <= 128
    # the source is untouched and the view verifies
    assert {s["file"]: s["sha256"] for s in ShardStore.open(src).manifest.shards} == before
    assert datagen("verify", str(src)).returncode == 0
    assert datagen("verify", str(view)).returncode == 0
    # running again refuses to overwrite the view
    again = datagen("dedupe", str(src))
    assert again.returncode == 1 and "exists" in again.stderr


def test_dedupe_on_prompt_vs_response(tmp_path):
    ids = ["r1", "r2", "r3"]
    store = ShardStore.create(tmp_path / "o", Output(path=tmp_path / "o"), job_meta=META)
    # same prompt, different answers: duplicates by prompt, not by response
    for rid, answer in zip(ids, ["alpha beta gamma delta", "one two three four five", "red green blue cyan"]):
        store.add("accepted", row(0, row_id=rid, response=answer,
                                  messages=[{"role": "user", "content": "the very same question text here"}]))
    store.commit_all()
    store.close()
    by_prompt = datagen("dedupe", str(tmp_path / "o"), "--on", "prompt", "--to", str(tmp_path / "p"))
    by_response = datagen("dedupe", str(tmp_path / "o"), "--on", "response", "--to", str(tmp_path / "r"))
    assert by_prompt.returncode == 0 and by_response.returncode == 0, by_prompt.stderr + by_response.stderr
    assert ShardStore.open(tmp_path / "p").manifest.counts()["accepted"] == 1
    assert ShardStore.open(tmp_path / "r").manifest.counts()["accepted"] == 3


def test_a_view_cannot_be_resumed_and_bad_settings_get_one_line(tmp_path):
    ids, texts = corpus(10, 1, seed=1)
    src = _store(tmp_path, ids, texts)
    bad = datagen("dedupe", str(src), "--threshold", "1.5")
    assert bad.returncode == 1 and bad.stderr.startswith("error: dedupe settings: threshold")
    assert "Traceback" not in bad.stderr
    assert datagen("dedupe", str(src)).returncode == 0
    res = datagen("resume", str(src / "dedupe"))
    assert res.returncode == 1 and "derived dataset" in res.stderr
