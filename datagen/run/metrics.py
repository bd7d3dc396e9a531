"""Run metrics: what each stage of the driver loop is doing, for the live progress display
and for ``OUT/metrics.jsonl``.

The driver loop (``Driver.loop``, run/driver.py) feeds three counters (prompts pulled, rows received
per teacher, rows judged) and calls ``tick`` once per turn. Queue depths are read from the
loop's own structures (``watch``), never copied, so the figures cost a few ``len()`` calls
a turn and memory that does not grow with the run.

``OUT/metrics.jsonl`` gets one JSON line every ``runtime.metrics_every_s`` seconds and a
last one (``"final": true``) when the run ends, however it ends; a resume appends to the
same file. Fields are listed in docs/architecture.md ("Run metrics"). On an object store
the lines go to a local file, uploaded whole at the end and at most once a minute while
shards are being committed: an S3 object cannot be appended to, and rewriting one every
few seconds would cost a PUT per line for a file nobody reads mid-run.

Not covered: figures of work inside the actors (an engine's own queue, HTTP requests in
flight); the Ray dashboard shows those per actor, and its address is printed at start
when the run joined a cluster that has one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter, deque
from datetime import datetime, timezone
from typing import Any

from datagen.errors import DatagenError
from datagen.storage.shards import is_url

METRICS_FILE = "metrics.jsonl"
VIEW_EVERY_S = 1.0  # how often the progress display's figures are recomputed
RATE_WINDOW = 5  # display rates are over the last few views (seconds), not since the start
UPLOAD_EVERY_S = 60.0  # object stores: the least time between two uploads of the file


def bounds(job: Any, limit: dict[str, int] | None = None) -> dict[str, int]:
    """The most each queue may hold, from the job's settings (the driver enforces them);
    ``limit``: the batches the driver keeps per replica of each teacher, once known."""
    from datagen.teachers.fleet import slots

    actors = sum(t.replicas for t in job.teachers)
    limit = limit or {}
    teacher_inflight = sum((limit.get(t.name) or slots(t, job.runtime.inflight_per_actor)) * t.replicas
                           for t in job.teachers)
    filter_inflight = job.runtime.filter_actors * job.runtime.inflight_per_actor
    return {
        "teacher_inflight_batches": teacher_inflight,
        # the driver pulls no prompt while one batch per actor waits; flushing partial
        # batches (prompts exhausted, quota reached) adds one per teacher
        "ready_batches": actors + len(job.teachers),
        "filter_inflight_batches": filter_inflight,
        # teacher work stops while the queue is over 4 x the actors' slots; batches
        # already at the teachers still land in it
        "filter_queued_batches": 4 * filter_inflight + teacher_inflight if filter_inflight else 0,
        "store_pending_rows": 3 * job.output.shard_rows,  # one open shard per stream
    }


def dashboard_links() -> dict[str, str] | None:
    """The Ray dashboard's address and this job's pages, when the cluster has one (a
    local instance started by datagen has it off)."""
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()  # no public getter outside ray.init's return
        job_id = ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - a link is a convenience; never stop a run for it
        return None
    if not url:
        return None
    url = url if "://" in url else f"http://{url}"
    return {"url": url, "job": f"{url}/#/jobs/{job_id}", "actors": f"{url}/#/actors"}


class RunMetrics:
    """Counters and queue depths of one run (``datagen run`` or ``resume``)."""

    def __init__(self, job: Any, store: Any, *, dashboard: dict[str, str] | None = None):
        self.every_s = job.runtime.metrics_every_s
        self.store = store
        self.dashboard = dashboard
        self.job = job
        self.bounds = bounds(job)
        # a teacher answered through provider batch jobs has no replicas (its figures: line["batches"])
        self.replicas = {t.name: 0 if t.in_batches else t.replicas for t in job.teachers}
        self.filter_actors = job.runtime.filter_actors
        self.started = time.monotonic()
        self.pulled = 0
        self.generated: Counter = Counter()  # teacher -> rows received from it
        self.judged = 0  # rows the filters gave verdicts for
        self.maxima = dict.fromkeys(self.bounds, 0)  # the deepest each queue has been
        self._committed_before = sum(store.manifest.counts().values())
        self._live: dict[str, Any] = {}
        self.view: dict[str, Any] | None = None  # the latest figures, for the display
        self._views: deque = deque(maxlen=RATE_WINDOW + 1)  # (time, counters) for display rates
        self._logged = (self.started, self._counters())  # at the last line written
        self.log = MetricsLog(store)

    # -- hooks in the driver loop --------------------------------------------------
    def watch(self, *, inflight: dict, ready: deque, actors: Any, filters: Any, dedup: Any = None) -> None:
        """The loop's own queues; read, never modified."""
        self._live = {"inflight": inflight, "ready": ready, "actors": actors, "filters": filters, "dedup": dedup}

    def teacher_slots(self, limit: dict[str, int]) -> None:
        """The driver's batches per replica, sized by what the started engines reported."""
        self.bounds = bounds(self.job, limit)
        self.maxima = {key: self.maxima.get(key, 0) for key in self.bounds}

    def pulled_one(self) -> None:
        self.pulled += 1

    def generated_rows(self, teacher: str, n: int) -> None:
        self.generated[teacher] += n

    def judged_rows(self, n: int) -> None:
        self.judged += n

    def tick(self, stats: Any) -> None:
        """Once per turn of the loop: note queue depths; now and then, figures and a line."""
        depths = self._depths()
        for key, value in depths.items():
            if value > self.maxima[key]:
                self.maxima[key] = value
        now = time.monotonic()
        if not self._views or now - self._views[-1][0] >= VIEW_EVERY_S:
            counters = self._counters()
            self._views.append((now, counters))
            self.view = self._snapshot(stats, now, counters, depths, since=self._views[0])
        if now - self._logged[0] >= self.every_s:
            self._write(stats, now)

    def close(self, stats: Any) -> None:
        """The last line (after the final commit), then the file is closed (and uploaded).
        The display's last frame shows the same figures."""
        self.view = self._write(stats, stats.generation_ended or time.monotonic(), final=True)["stages"]
        self.log.close()

    # -- figures ---------------------------------------------------------------------
    def _depths(self) -> dict[str, int]:
        live = self._live
        if not live:
            return {"store_pending_rows": self._pending()}
        filters = live["filters"]
        return {
            "teacher_inflight_batches": len(live["inflight"]),
            "ready_batches": len(live["ready"]),
            "filter_inflight_batches": len(filters.inflight),
            "filter_queued_batches": len(filters.queue),
            "store_pending_rows": self._pending(),
        }

    def _pending(self) -> int:
        return sum(w.open_rows for w in self.store.writers.values())

    def _counters(self) -> dict[str, int]:
        return {"pulled": self.pulled, "judged": self.judged,
                "committed": sum(self.store.manifest.counts().values()) - self._committed_before,
                **{f"teacher:{name}": n for name, n in self.generated.items()}}

    def _snapshot(self, stats: Any, now: float, counters: dict[str, int], depths: dict[str, int],
                  since: tuple[float, dict[str, int]]) -> dict[str, Any]:
        secs = now - since[0]

        def rate(key: str) -> float:
            return round((counters.get(key, 0) - since[1].get(key, 0)) / secs, 1) if secs > 0 else 0.0

        live = self._live
        load = live["actors"].load if live else {}
        by_teacher = {}
        for name, replicas in self.replicas.items():
            actors = live["actors"].by_teacher.get(name, []) if live else []
            by_teacher[name] = {
                "replicas": replicas,
                "inflight_batches": sum(load.get(a, 0) for a in actors),
                "ready_batches": sum(1 for n, _ in live["ready"] if n == name) if live else 0,
                "rows": counters.get(f"teacher:{name}", 0),
                "rows_per_s": rate(f"teacher:{name}"),
            }
        dedup = live.get("dedup")
        return {
            "prompts": {"pulled": counters["pulled"], "skipped": stats.skipped, "total": stats.total,
                        "per_s": rate("pulled")},
            "teacher": {"inflight_batches": depths.get("teacher_inflight_batches", 0),
                        "ready_batches": depths.get("ready_batches", 0),
                        "rows": sum(t["rows"] for t in by_teacher.values()),
                        "rows_per_s": round(sum(t["rows_per_s"] for t in by_teacher.values()), 1),
                        "by_teacher": by_teacher},
            "filters": {"actors": self.filter_actors,
                        "inflight_batches": depths.get("filter_inflight_batches", 0),
                        "queued_batches": depths.get("filter_queued_batches", 0),
                        "rows": counters["judged"], "rows_per_s": rate("judged")},
            "dedupe": None if dedup is None else {
                "indexed": len(dedup.parent), "waiting": len(dedup.pending), "candidate_pairs": dedup.checked},
            "store": {"committed": counters["committed"], "rows_per_s": rate("committed"),
                      "pending": depths["store_pending_rows"], "shards": len(self.store.manifest.shards)},
        }

    def _write(self, stats: Any, now: float, *, final: bool = False) -> dict[str, Any]:
        counters = self._counters()
        # The last line's rates are over the whole of generation (the summary's rows/s).
        since = (stats.teachers_ready or self.started, {}) if final else self._logged
        line = {
            "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "elapsed_s": round(now - stats.started, 2),
            "interval_s": round(now - since[0], 2),
            "final": final,
            "stages": self._snapshot(stats, now, counters, self._depths(), since=since),
            "counts": {s: stats.counts[s] for s in ("accepted", "rejected", "failed")},
            "max": dict(self.maxima),
            "bounds": self.bounds,
        }
        if final:
            line |= {"interrupted": stats.interrupted, "stop_reason": stats.stop_reason}
        if stats.batches is not None and (batches := stats.batches.view()) is not None:
            line["batches"] = batches  # provider batch jobs (datagen/batch/)
        if self.dashboard:
            line["dashboard"] = self.dashboard
        self._logged = (now, counters)
        self.log.append(line)
        return line


class MetricsLog:
    """``OUT/metrics.jsonl``: appended to on a local disk; on an object store, a local
    file uploaded whole (see the module docstring). A metrics file that cannot be written
    never stops a run: ``problem`` says why it stopped being written."""

    def __init__(self, store: Any):
        self.store = store
        self.problem: str | None = None
        self._remote = is_url(store.root)
        self._uploaded = (time.monotonic(), len(store.manifest.shards))
        try:
            if self._remote:
                fd, self.path = tempfile.mkstemp(prefix="datagen-metrics-", suffix=".jsonl")
                self._file = os.fdopen(fd, "a")
                self._file.write(store.read_text(METRICS_FILE) or "")  # a resume appends
            else:
                self.path = str(store.root / METRICS_FILE)
                self._file = open(self.path, "a")
        except (OSError, DatagenError) as exc:
            self._file = None
            self.problem = f"cannot write {store.root}/{METRICS_FILE}: {exc}"

    def append(self, line: dict[str, Any]) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as exc:
            self.problem = f"cannot write {self.store.root}/{METRICS_FILE}: {exc}"
            self._close_file()
            return
        shards = len(self.store.manifest.shards)
        if self._remote and shards != self._uploaded[1] and time.monotonic() - self._uploaded[0] >= UPLOAD_EVERY_S:
            self._upload()

    def close(self) -> None:
        if self._file is None:
            return
        self._close_file()
        if self._remote:
            self._upload()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _close_file(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None

    def _upload(self) -> None:
        try:
            with open(self.path) as f:
                self.store.put_text(METRICS_FILE, f.read())
        except (OSError, DatagenError) as exc:
            self.problem = f"cannot upload {self.store.root}/{METRICS_FILE}: {exc}"
            return
        self._uploaded = (time.monotonic(), len(self.store.manifest.shards))
