"""Streaming dedupe during `datagen run`: an index spread over Ray actors gives the same
kept set as batch mode, whatever the actor count, and survives a kill and resume."""

from __future__ import annotations

import json
import os
import random
import re
import signal

import pyarrow.parquet as pq
import pytest
import yaml

from datagen.storage.shards import ShardStore
from datagen.testing.fake_openai import FakeOpenAIServer

from .conftest import datagen, write_job
from .test_pipeline import _start, _wait_for_rows


def near_duplicate_answer(messages):
    """Valid JSON whose long 'note' depends on the product only, plus one word from the
    order number: rows about the same product are near-duplicates of each other."""
    text = messages[-1]["content"]
    order = re.search(r"\d{5}", text).group(0)
    product = next(p for p in PRODUCTS if p in text)
    rng = random.Random(product)
    words = [rng.choice(VOCAB) for _ in range(80)]
    words[order[-1] == "7" and 3 or 5] = f"ref{order[-2:]}"
    return json.dumps({"order_id": order, "product": product, "note": " ".join(words)})


PRODUCTS = ["desk lamp", "coffee grinder", "running shoes", "blender", "tea kettle", "yoga mat", "office chair",
            "bluetooth speaker", "winter jacket", "phone case", "air fryer", "backpack", "wireless mouse",
            "standing desk", "water bottle", "electric toothbrush", "hiking boots", "bed sheets", "laptop stand",
            "rice cooker", "gaming headset", "throw pillow", "camping tent", "smart watch", "toaster"]
VOCAB = [f"w{i}" for i in range(400)]


def _job(tmp_path, base_url, name, actors, **kw):
    job = write_job(tmp_path / name, base_url=base_url, count=60, name=name, **kw)
    data = yaml.safe_load(job.read_text())
    data["teachers"][0]["sampling"]["max_tokens"] = 400
    data["dedupe"] = {"streaming": True, "actors": actors}
    job.write_text(yaml.safe_dump(data))
    return job


def _kept(view) -> set[str]:
    return {r["row_id"] for r in pq.read_table(view / "clusters.parquet").to_pylist() if r["kept"]}


@pytest.fixture
def dup_server():
    with FakeOpenAIServer(answer=near_duplicate_answer) as s:
        yield s


def test_streaming_equals_batch_for_any_actor_count(tmp_path, dup_server):
    results = {}
    for actors in (1, 3):
        (tmp_path / f"a{actors}").mkdir()
        job = _job(tmp_path, dup_server.base_url, f"a{actors}", actors)
        res = datagen("run", str(job))
        assert res.returncode == 0, res.stderr
        assert "unique (dedupe view)" in res.stdout
        out = tmp_path / f"a{actors}" / "out"
        results[actors] = _kept(out / "dedupe")
        assert datagen("verify", str(out / "dedupe")).returncode == 0
        report = json.loads((out / "dedupe" / "report.json").read_text())
        assert report["mode"] == "streaming" and report["actors"] == actors
    assert results[1] == results[3]
    # batch mode over the same committed rows agrees
    out = tmp_path / "a1" / "out"
    assert datagen("dedupe", str(out), "--to", str(tmp_path / "batch")).returncode == 0
    assert _kept(tmp_path / "batch") == results[1]
    accepted = ShardStore.open(out).manifest.counts()["accepted"]
    assert 0 < len(results[1]) < accepted  # there really were duplicates to remove
    # every kept row is the smallest id of its cluster
    clusters = pq.read_table(out / "dedupe" / "clusters.parquet").to_pylist()
    for c in clusters:
        assert c["cluster"] <= c["row_id"]


def test_streaming_index_survives_kill_and_resume(tmp_path, dup_server):
    (tmp_path / "ref").mkdir()
    (tmp_path / "k").mkdir()
    ref = _job(tmp_path, dup_server.base_url, "ref", 2)
    assert datagen("run", str(ref), "--quiet").returncode == 0
    expected = _kept(tmp_path / "ref" / "out" / "dedupe")

    dup_server.inject("latency", times=None, seconds=0.1)
    job = _job(tmp_path, dup_server.base_url, "k", 2, batch_size=2, shard_rows=4, commit_every_s=0.2)
    out = tmp_path / "k" / "out"
    proc = _start(job)
    _wait_for_rows(out, proc, 12)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "dedupe").exists()
    dup_server.clear()
    res = datagen("resume", str(out))
    assert res.returncode == 0, res.stderr
    assert _kept(out / "dedupe") == expected


def test_streaming_index_is_order_independent_and_equals_batch():
    import ray

    from datagen.dedupe import minhash as mh
    from datagen.config import Dedupe
    from datagen.dedupe.streaming import StreamingDedupe

    from .test_minhash import corpus

    ids, texts = corpus(120, 3, seed=21)
    ids = [f"{i * 7919:032x}" for i in range(len(ids))]  # hex ids, like real row ids
    batch = mh.find_clusters(ids, texts)
    expected = {ids[i] for i in batch.kept()}
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        for actors, seed in ((1, 0), (3, 1), (2, 2)):
            order = list(range(len(ids)))
            random.Random(seed).shuffle(order)
            sd = StreamingDedupe(Dedupe(actors=actors))
            for i in order:
                sd.add(ids[i], texts[i])
            roots = sd.roots()
            assert {r for r, root in roots.items() if r == root} == expected
    finally:
        ray.shutdown()
