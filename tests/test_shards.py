"""The shard store's commit protocol, with real files, real Parquet and real kills."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from datagen import records
from datagen.config import Output
from datagen.errors import OutputError
from datagen.storage.shards import MANIFEST, ShardStore

META = {"name": "t", "run_fingerprint": "fp", "job": {}}


def row(i: int, **kw) -> dict:
    r = records.empty_row()
    r.update(row_id=f"id{i:06d}", prompt_id=f"p{i}", sample_index=0,
             messages=[{"role": "user", "content": f"message {i} " + "x" * 50}],
             response=f"answer {i}", finish_reason="stop",
             license={"teacher": "Apache-2.0", "seed": "MIT", "template": "Apache-2.0"})
    r.update(kw)
    return r


def output(**kw) -> Output:
    return Output.model_validate({"path": "/unused", **kw})


def committed_rows(root: Path) -> list[str]:
    store = ShardStore.open(root)
    return store.read("accepted", columns=["row_id"]).column("row_id").to_pylist()


def test_manifest_counts_equal_shard_rows_and_checksums(tmp_path):
    store = ShardStore.create(tmp_path / "o", output(shard_rows=10), job_meta=META)
    for i in range(35):
        store.add("accepted", row(i))
    store.add("rejected", row(100, verdicts=[{"filter": "f", "keep": False, "reason": "x.bad",
                                              "score": None, "details": None}]))
    store.commit_all()
    store.close()
    m = ShardStore.open(tmp_path / "o").manifest
    acc = [s for s in m.shards if s["stream"] == "accepted"]
    assert [s["rows"] for s in acc] == [10, 10, 10, 5]
    for s in m.shards:
        path = tmp_path / "o" / s["file"]
        assert pq.ParquetFile(path).metadata.num_rows == s["rows"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
        assert pq.read_schema(path).metadata[b"datagen.schema_version"] == records.SCHEMA_VERSION.encode()
    assert m.counts() == {"accepted": 35, "rejected": 1, "failed": 0}
    assert m.reasons("rejected") == {"x.bad": 1}
    assert acc[0]["license_summary"]["seed"] == {"MIT": 10}
    assert sorted(committed_rows(tmp_path / "o")) == [f"id{i:06d}" for i in range(35)]


def test_a_store_opens_from_a_str_path_and_add_returns_the_recorded_reason(tmp_path):
    """``open_store``/``create_store`` take a str as well as a Path; ``add`` hands back the
    reason the manifest counts, the one the driver's stats use (None for accepted rows)."""
    from datagen.storage import create_store, open_store

    store = create_store(str(tmp_path / "o"), output(), job_meta=META)
    assert store.add("accepted", row(1)) is None
    bad = [{"filter": "f", "keep": False, "reason": "x.bad", "score": None, "details": None}]
    assert store.add("rejected", row(2, verdicts=bad)) == "x.bad"
    store.commit_all()
    store.close()
    reopened = open_store(str(tmp_path / "o"))
    assert reopened.manifest.counts() == {"accepted": 1, "rejected": 1, "failed": 0}
    assert reopened.manifest.reasons("rejected") == {"x.bad": 1}


def test_tables_and_rows_land_in_the_same_shards(tmp_path):
    """add_table (a derived store copying committed rows) rolls over and commits as add
    does: same shards, same manifest entries, rows in the order they were given."""
    bad = [{"filter": "f", "keep": False, "reason": "x.bad", "score": None, "details": None}]
    rows = [row(i) for i in range(23)] + [row(100 + i, verdicts=bad) for i in range(4)]
    by_row = ShardStore.create(tmp_path / "r", output(shard_rows=10, row_group_rows=4), job_meta=META)
    by_table = ShardStore.create(tmp_path / "t", output(shard_rows=10, row_group_rows=4), job_meta=META)
    for r in rows:
        by_row.add("rejected" if r["verdicts"] else "accepted", r)
    by_table.add("accepted", rows[0])  # one row first: the table continues its open shard
    by_table.add_table("accepted", records.to_table(rows[1:23]))
    by_table.add_table("rejected", records.to_table(rows[23:]))
    for store in (by_row, by_table):
        store.commit_all()
    strip = [{k: v for k, v in s.items() if k not in ("sha256", "bytes", "committed_at")}
             for s in by_row.manifest.shards]
    assert [{k: v for k, v in s.items() if k not in ("sha256", "bytes", "committed_at")}
            for s in by_table.manifest.shards] == strip
    assert [s["rows"] for s in strip if s["stream"] == "accepted"] == [10, 10, 3]
    assert by_table.manifest.reasons("rejected") == {"x.bad": 4}
    assert by_table.read("accepted").to_pylist() == by_row.read("accepted").to_pylist()


def test_rollover_by_bytes(tmp_path):
    store = ShardStore.create(tmp_path / "o", output(shard_bytes=4096, row_group_rows=2, compression="none"),
                              job_meta=META)
    for i in range(60):
        store.add("accepted", row(i, response="y" * 400))
    store.commit_all()
    shards = store.manifest.shards
    assert len(shards) > 3
    assert sum(s["rows"] for s in shards) == 60
    # A shard closes at the first row group that takes its data past the limit (the
    # Parquet footer, written on close, comes on top).
    assert max(s["rows"] for s in shards) <= 6


def test_commit_every_s_makes_partial_shards_due(tmp_path):
    store = ShardStore.create(tmp_path / "o", output(commit_every_s=0.05), job_meta=META)
    store.add("accepted", row(1))
    assert committed_rows(tmp_path / "o") == []
    time.sleep(0.1)
    store.commit_due()
    assert committed_rows(tmp_path / "o") == ["id000001"]


def _one_committed_row(root: Path) -> Path:
    store = ShardStore.create(root, output(), job_meta=META)
    store.add("accepted", row(1))
    store.commit_all()
    store.close()
    return root


def test_readers_trust_the_manifest_and_resume_sweeps_the_rest(tmp_path):
    root = _one_committed_row(tmp_path / "o")
    # An orphan shard (renamed, crash before the manifest) and a half-written temp file.
    orphan = root / "accepted" / "part-000001.parquet"
    orphan.write_bytes((root / "accepted" / "part-000000.parquet").read_bytes())
    tmp = root / "accepted" / ".part-000002.parquet.tmp"
    tmp.write_bytes(b"PAR1 half a file")
    assert committed_rows(root) == ["id000001"]
    resumed = ShardStore.open(root, output(), for_writing=True)
    assert not orphan.exists() and not tmp.exists()
    resumed.add("accepted", row(2))
    resumed.commit_all()
    assert sorted(committed_rows(root)) == ["id000001", "id000002"]


def test_one_writer_at_a_time(tmp_path):
    root = tmp_path / "o"
    first = ShardStore.create(root, output(), job_meta=META)
    with pytest.raises(OutputError, match="another datagen process"):
        ShardStore.open(root, output(), for_writing=True)
    first.close()
    ShardStore.open(root, output(), for_writing=True).close()


@pytest.mark.parametrize("setup,match", [
    (lambda p: p.write_text("x"), "is a file"),
    (lambda p: (p.mkdir(), (p / "something").write_text("x")), "not empty"),
])
def test_create_refuses_unusable_output(tmp_path, setup, match):
    target = tmp_path / "o"
    setup(target)
    with pytest.raises(OutputError, match=match):
        ShardStore.create(target, output(), job_meta=META)


def test_create_refuses_existing_run_and_points_to_resume(tmp_path):
    ShardStore.create(tmp_path / "o", output(), job_meta=META).close()
    with pytest.raises(OutputError, match="datagen resume"):
        ShardStore.create(tmp_path / "o", output(), job_meta=META)


def test_open_non_output_is_clear(tmp_path):
    with pytest.raises(OutputError, match="not found"):
        ShardStore.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(OutputError, match="not a datagen output"):
        ShardStore.open(tmp_path / "plain")
    (tmp_path / "plain" / MANIFEST).write_text("{truncated")
    with pytest.raises(OutputError, match="corrupt"):
        ShardStore.open(tmp_path / "plain")


CHILD = textwrap.dedent("""
    import sys, time, resource, signal
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from tests.test_shards import row, output, META
    from datagen.storage.shards import ShardStore
    mode = sys.argv[1]
    store = ShardStore.create(Path(sys.argv[2]), output(shard_rows=100, row_group_rows=5), job_meta=META)
    for i in range(100):
        store.add("accepted", row(i))          # shard 0 commits at row 100
    if mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        for i in range(100, 100000):
            store.add("accepted", row(i, response="z" * 2000))
    else:
        print("committed", flush=True)
        i = 100
        while True:                            # shard 1 grows, row group by row group
            store.add("accepted", row(i)); i += 1
            time.sleep(0.002)
""")


def _child(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(repo=str(Path(__file__).resolve().parent.parent)))
    return subprocess.Popen([sys.executable, str(script), mode, str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_writer_killed_mid_file_leaves_nothing_a_reader_trusts(tmp_path):
    proc = _child(tmp_path, "kill")
    assert proc.stdout.readline().strip() == "committed"
    tmp = tmp_path / "o" / "accepted" / ".part-000001.parquet.tmp"
    deadline = time.monotonic() + 30
    while not (tmp.exists() and tmp.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp.exists()  # the half-written shard is there ...
    rows = committed_rows(tmp_path / "o")
    assert sorted(rows) == [f"id{i:06d}" for i in range(100)]  # ... and nobody reads it
    with pytest.raises(Exception):
        pq.read_table(tmp)  # it is not even a valid Parquet file (no footer)
    ShardStore.open(tmp_path / "o", output(), for_writing=True).close()
    assert not tmp.exists()


def test_full_disk_stops_with_clear_error_and_keeps_committed_rows(tmp_path):
    # RLIMIT_FSIZE makes writes past 20 kB fail the way a full disk does, in a child only.
    proc = _child(tmp_path, "fsize")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "out of disk space (File too large)" in err
    assert "every committed shard is intact" in err and "datagen resume" in err
    assert sorted(committed_rows(tmp_path / "o")) == [f"id{i:06d}" for i in range(100)]


def test_damaged_outputs_get_one_line_errors(tmp_path):
    from .conftest import datagen

    root = _one_committed_row(tmp_path / "o")
    (root / "accepted" / "part-000000.parquet").unlink()
    res = datagen("inspect", str(root))
    assert res.returncode == 1 and "listed in the manifest but missing" in res.stderr
    (root / "datagen-job.json").unlink()
    res = datagen("resume", str(root))
    assert res.returncode == 1 and "datagen-job.json is missing or corrupt" in res.stderr
    (root / MANIFEST).write_text('{"format": "datagen-shards", "schema_version": "9.0", "shards": []}')
    res = datagen("inspect", str(root))
    assert res.returncode == 1 and "schema version 9.0 is not readable" in res.stderr
    assert "Traceback" not in res.stderr


RESUMABLE_CHILD = textwrap.dedent("""
    import os, sys, signal
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from tests.test_shards import row, output, META
    from datagen.storage.derived import resumable_build
    with resumable_build(Path(sys.argv[1]), dict(META, step={{"k": 5}}), key="step",
                         output=output(shard_rows=10)) as store:
        for i in range(25):
            store.add("accepted", row(i))  # shards of 10 commit at rows 10 and 20
        os.kill(os.getpid(), signal.SIGKILL)  # rows 20..24 were never committed
""")


def test_resumable_build_keeps_what_a_killed_build_committed_and_continues(tmp_path):
    from datagen.storage.derived import resumable_build

    dest, meta = tmp_path / "view", dict(META, step={"k": 5})
    script = tmp_path / "child.py"
    script.write_text(RESUMABLE_CHILD.format(repo=str(Path(__file__).resolve().parent.parent)))
    proc = subprocess.run([sys.executable, str(script), str(dest)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not dest.exists()
    # Another key is refused, naming the directory, and leaves the partial store alone.
    with pytest.raises(OutputError, match=r"\.view\.partial holds a half-finished step with other settings"):
        with resumable_build(dest, dict(META, step={"k": 6}), key="step", output=output()):
            pass
    with resumable_build(dest, meta, key="step", output=output(shard_rows=10)) as store:
        assert store.resumed
        done = store.row_ids(("accepted",))
        assert done == {f"id{i:06d}" for i in range(20)}
        for i in range(30):
            if f"id{i:06d}" not in done:
                store.add("accepted", row(i))
    assert not (tmp_path / ".view.partial").exists()
    rows = committed_rows(dest)
    assert sorted(rows) == [f"id{i:06d}" for i in range(30)]  # each once


def test_resumable_build_commits_rows_received_before_an_error(tmp_path):
    from datagen.storage.derived import resumable_build

    dest, meta = tmp_path / "view", dict(META, step=1)
    with pytest.raises(RuntimeError):
        with resumable_build(dest, meta, key="step", output=output()) as store:
            assert not store.resumed
            store.add("accepted", row(1))
            raise RuntimeError("engine died")
    assert committed_rows(tmp_path / ".view.partial") == ["id000001"]
    with resumable_build(dest, meta, key="step", output=output()) as store:
        assert store.resumed and store.row_ids(("accepted",)) == {"id000001"}
    assert committed_rows(dest) == ["id000001"]
    with pytest.raises(OutputError, match="destination exists"):
        with resumable_build(dest, meta, key="step", output=output()):
            pass
