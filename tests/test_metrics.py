"""Run metrics through the real CLI: OUT/metrics.jsonl after a run against the fake server
(local Ray, filter actor, streaming dedupe), its last line against the manifest, and every
queue depth it saw against the bounds the job's settings give."""

from __future__ import annotations

import json

import yaml

from datagen.storage.shards import ShardStore

from .conftest import datagen, write_job


def lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_file_matches_the_manifest_and_queues_stay_bounded(tmp_path, fake_server):
    fake_server.inject("latency", times=None, seconds=0.05)  # a run of a few seconds: several lines
    job = write_job(tmp_path, base_url=fake_server.base_url, count=40, n=2, shard_rows=15, batch_size=4,
                    extra_teacher={"replicas": 2},
                    runtime={"num_cpus": 2, "inflight_per_actor": 2, "filter_actors": 1, "metrics_every_s": 0.2},
                    dedupe={"streaming": True})
    res = datagen("run", str(job))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    got = lines(out)
    assert len(got) >= 3 and [m["final"] for m in got] == [False] * (len(got) - 1) + [True]
    final = got[-1]
    counts = ShardStore.open(out).manifest.counts()
    # The last line is written after the final commit: its counts are the manifest's.
    assert final["counts"] == counts and counts["accepted"] > 0 and counts["rejected"] > 0
    st = final["stages"]
    assert st["store"]["committed"] == sum(counts.values()) == 80 and st["store"]["pending"] == 0
    assert st["prompts"]["pulled"] == 80 and st["prompts"]["total"] == 80
    assert st["teacher"]["rows"] == st["teacher"]["by_teacher"]["fake"]["rows"] == 80
    assert st["filters"]["rows"] == 80 - counts["failed"]
    assert st["dedupe"]["indexed"] == counts["accepted"]
    assert final["interrupted"] is False and "dashboard" not in final  # local Ray: no dashboard
    # Bounds from the settings: 2 replicas x 2 slots at the teachers; one ready batch per
    # actor (+1 partial batch when the prompts run out); 1 filter actor x 2 slots, its
    # queue at most 4x that plus what the teachers hold; one open shard per stream.
    hand = {"teacher_inflight_batches": 4, "ready_batches": 3, "filter_inflight_batches": 2,
            "filter_queued_batches": 4 * 2 + 4, "store_pending_rows": 3 * 15}
    assert final["bounds"] == hand
    for key, bound in hand.items():
        assert 0 <= final["max"][key] <= bound, key
    assert final["max"]["teacher_inflight_batches"] > 0 and final["max"]["store_pending_rows"] > 0
    for m in got:
        s = m["stages"]
        assert s["teacher"]["inflight_batches"] <= hand["teacher_inflight_batches"]
        assert s["teacher"]["ready_batches"] <= hand["ready_batches"]
        assert s["filters"]["inflight_batches"] <= hand["filter_inflight_batches"]
        assert s["filters"]["queued_batches"] <= hand["filter_queued_batches"]
        assert s["store"]["pending"] <= hand["store_pending_rows"]
    # Counters only grow, line after line.
    committed = [m["stages"]["store"]["committed"] for m in got]
    assert committed == sorted(committed)
    # The live display's stage lines (rich prints its last frame when stderr is not a terminal).
    assert "teacher  fake: " in res.stderr and "store    80 committed" in res.stderr

    # A resume with nothing left to do appends its own lines, ending with its own totals.
    res = datagen("resume", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    again = lines(out)
    assert again[:len(got)] == got and again[-1]["final"]
    assert again[-1]["stages"]["prompts"]["skipped"] == 80 and again[-1]["stages"]["store"]["committed"] == 0
    assert again[-1]["counts"] == {"accepted": 0, "rejected": 0, "failed": 0}


def test_metrics_interval_is_validated(tmp_path, fake_server):
    job = write_job(tmp_path, base_url=fake_server.base_url, runtime={"metrics_every_s": 0})
    res = datagen("validate", str(job))
    assert res.returncode == 1 and "runtime.metrics_every_s" in res.stderr
    data = yaml.safe_load(job.read_text())
    data["runtime"]["metrics_every_s"] = 5
    job.write_text(yaml.safe_dump(data))
    assert datagen("validate", str(job)).returncode == 0
