"""What a person sees: the live progress line, the end-of-run summary, ``inspect``."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from datagen import records
from datagen.run.stats import RunStats
from datagen.storage.shards import ShardStore


class _StageProgress(Progress):
    """The progress bar, and under it one line per stage of the pipeline."""

    stage_lines: list[str] = []  # replaced whole by LiveProgress, never appended to

    def get_renderables(self) -> Any:
        yield self.make_tasks_table(self.tasks)
        if self.stage_lines:
            yield Text("\n".join(self.stage_lines), style="dim")


def stage_lines(view: dict[str, Any]) -> list[str]:
    """The run's figures (``RunMetrics.view``) as one short line per stage."""
    p, t, f, d, s = (view[k] for k in ("prompts", "teacher", "filters", "dedupe", "store"))
    lines = [f"  prompts  {p['pulled']} pulled ({p['per_s']:.0f}/s)"
             + (f", {p['skipped']} done before" if p["skipped"] else "")]
    for name, x in t["by_teacher"].items():
        lines.append(f"  teacher  {name}: {x['inflight_batches']} batches in flight on {x['replicas']} "
                     f"replica(s), {x['ready_batches']} ready · {x['rows_per_s']:.0f} rows/s")
    lines.append(f"  filters  {f['inflight_batches']} batches in flight, {f['queued_batches']} queued · "
                 f"{f['rows_per_s']:.0f} rows/s" + ("" if f["actors"] else " (in the driver)"))
    if d is not None:
        lines.append(f"  dedupe   {d['indexed']} rows indexed, {d['waiting']} waiting · "
                     f"{d['candidate_pairs']} candidate pairs checked")
    lines.append(f"  store    {s['committed']} committed ({s['rows_per_s']:.0f} rows/s) in {s['shards']} shards · "
                 f"{s['pending']} not yet committed")
    return lines


def batch_line(view: dict[str, Any] | None) -> str | None:
    """Provider batch jobs (``BatchRoom.view``) as one line: batches by status, rows by state."""
    if view is None:
        return None
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(view["by_status"].items()))
    rows = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in view["rows"].items() if n)
    line = (f"  batches  {view['submitted']} submitted{': ' + statuses if statuses else ''}"
            f" · rows: {rows or 'none yet'}")
    return line + (f" · last poll: {view['problem']}" if view["problem"] else "")


def batch_table(root: Any) -> Table | None:
    """An output's provider batches (``OUT/batches/state.json``), for ``inspect``."""
    from datagen.batch import BatchState

    state = BatchState.peek(root) if not isinstance(root, str) else None
    if state is None or not state.batches:
        return None
    t = Table(title="provider batches")
    for col in ("batch", "teacher", "provider id", "status", "rows", "submission", "completed / failed"):
        t.add_column(col)
    for b in state.batches.values():
        c = b.counts
        t.add_row(b.key, b.teacher, b.id or "-", b.status, str(b.rows), str(b.attempt),
                  f"{c.get('completed', 0)} / {c.get('failed', 0)}" if c else "-")
    return t


class LiveProgress:
    """A rich progress bar fed by ``run.execute``'s ``on_progress`` callback, with the run's
    per-stage figures under it and the Ray dashboard's address above it (when the run
    joined a cluster that has one)."""

    def __init__(self, console: Console, label: str):
        self.progress = _StageProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
            console=console, transient=False,
        )
        self.task = self.progress.add_task(label, total=None, detail="starting teachers…")
        self._linked = False

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, stats: RunStats) -> None:
        m = stats.metrics
        if m is not None and m.dashboard and not self._linked:
            self._linked = True
            d = m.dashboard
            self.progress.console.print(f"Ray dashboard: {d['url']}  (this job: {d['job']} · actors: {d['actors']})",
                                        soft_wrap=True, highlight=False)
        if m is not None and m.view is not None:
            batches = batch_line(stats.batches.view() if stats.batches is not None else None)
            self.progress.stage_lines = stage_lines(m.view) + ([batches] if batches else [])
        c = stats.counts
        if stats.teachers_ready is None:
            detail = "starting teachers…"
        else:
            rate = stats.generated / stats.generating_s if stats.generating_s > 0 else 0.0
            detail = (f"accepted {c['accepted']} · rejected {c['rejected']} · failed {c['failed']}"
                      f" · {rate:.2f} rows/s")
        self.progress.update(self.task, total=stats.total, completed=stats.skipped + stats.generated,
                             detail=detail)


def summary_table(stats: RunStats, store: ShardStore) -> Table:
    t = Table(title=f"datagen run: {store.manifest.data['job']}", show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("this run", justify="right")
    t.add_column("in output", justify="right")
    totals = store.manifest.counts()
    t.add_row("rows generated", str(stats.generated), str(sum(totals.values())))
    if stats.skipped:
        t.add_row("rows already committed (skipped)", str(stats.skipped), "")
    unresolved = store.unresolved_failures()
    for stream in records.STREAMS:
        if stream == "failed":
            t.add_row("failed (unresolved in output)", str(stats.counts[stream]), str(unresolved))
        else:
            t.add_row(stream, str(stats.counts[stream]), str(totals[stream]))
        overall = store.manifest.reasons(stream)
        for reason, n in sorted(overall.items(), key=lambda kv: -kv[1]):
            t.add_row(f"  {reason}", str(stats.reasons[(stream, reason)]), str(n))
    if stats.unique is not None:
        t.add_row("unique (dedupe view)", "", str(stats.unique))
    if stats.stop_reason:  # target_accepted, a budget, or prompts that ran out before the target
        t.add_row("stopped by", stats.stop_reason, "")
    secs = max(stats.generating_s, 1e-9)
    t.add_row("prompt tokens", str(stats.prompt_tokens), "")
    t.add_row("completion tokens", str(stats.completion_tokens), "")
    if stats.cost_usd is not None:  # some teacher has a price in the job file
        t.add_row("cost (USD)", f"{stats.cost_usd:.4f}", "")
        accepted = stats.counts["accepted"]
        t.add_row("  per accepted row", f"{stats.cost_usd / accepted:.6f}" if accepted else "-", "")
    batches = stats.batches.view() if stats.batches is not None else None
    if batches is not None:
        t.add_row("provider batches submitted", str(batches["submitted"]), "")
        if batches["batch_usd"] is not None:
            t.add_row("  batch rows at the batch price (USD)", f"{batches['batch_usd']:.4f}", "")
            t.add_row("  the same rows online (USD)", f"{batches['online_usd']:.4f}", "")
    t.add_row("wall time", f"{stats.elapsed:.1f} s", "")
    t.add_row("  teacher start-up", f"{stats.startup_s:.1f} s", "")
    t.add_row("  generating", f"{stats.generating_s:.1f} s", "")
    t.add_row("rows/s (generating)", f"{stats.generated / secs:.2f}", "")
    t.add_row("completion tokens/s (generating)", f"{stats.completion_tokens / secs:.1f}", "")
    t.add_row("shards", "", str(len(store.manifest.shards)))
    return t


def where_line(store: ShardStore) -> str:
    """Printed under the summary, unwrapped, so the path can be copied whole."""
    return f"shards: {store.root}  (look inside: datagen inspect {store.root})"


def inspect_output(store: ShardStore, console: Console, *, rows: int = 3, stream: str = "accepted",
                   as_json: bool = False) -> None:
    m = store.manifest
    counts = m.counts()
    reasons = {s: dict(m.reasons(s)) for s in ("rejected", "failed")}
    unresolved = store.unresolved_failures()
    licenses = m.license_totals()
    sample = []
    for i, row in enumerate(store.iter_rows(stream, batch_rows=max(rows, 1))):
        if i >= rows:
            break
        sample.append(row)
    prompts = _prompts_report(store)
    if as_json:
        console.print_json(json.dumps({
            "prompts": prompts,
            "job": m.data["job"], "run_fingerprint": m.data["run_fingerprint"],
            "schema_version": m.data["schema_version"], "counts": counts,
            "failed_unresolved": unresolved, "reasons": reasons,
            "licenses": licenses,
            "shards": len(m.shards), "sample": sample, "batches": _batches_json(store),
        }, default=str))
        return
    t = Table(title=f"{store.root}  (job {m.data['job']}, schema {m.data['schema_version']})")
    t.add_column("stream")
    t.add_column("rows", justify="right")
    t.add_column("shards", justify="right")
    t.add_column("reasons")
    for s in records.STREAMS:
        n_shards = sum(1 for sh in m.shards if sh["stream"] == s)
        why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.get(s, {}).items(), key=lambda kv: -kv[1]))
        if s == "failed" and counts[s]:
            why += f"  ({unresolved} unresolved)"
        t.add_row(s, str(counts[s]), str(n_shards), why)
    console.print(t)
    batches = batch_table(store.root)
    if batches is not None:
        console.print(batches)
    for key, c in licenses.items():
        console.print(f"license {key}: " + ", ".join(f"{k} ({v})" for k, v in c.items()))
    if prompts is not None:
        from datagen.prompts.diversity import lines

        for line in lines(prompts):
            console.print(line, highlight=False)
    console.print(f"columns (schema {records.SCHEMA_VERSION}): " + ", ".join(records.FIELDS))
    for row in sample:
        user = row["messages"][-1]["content"]
        console.rule(f"{stream} row {row['row_id'][:12]}")
        console.print(f"[bold]prompt[/bold]   {user[:300]}")
        console.print(f"[bold]response[/bold] {(row['response'] or '')[:300]}")
        extra = f"teacher {row['teacher']['name']} · finish {row['finish_reason']}"
        if row["token_logprobs_q"] is not None:
            extra += f" · logprobs for {len(row['token_logprobs_q'])} tokens, top-{len(row['top_ids'][0]) if row['top_ids'] else 0}"
        if row["error"]:
            extra += f" · error {row['error']}"
        console.print(extra, style="dim")


def _batches_json(store: ShardStore) -> list[dict[str, Any]] | None:
    import dataclasses

    from datagen.batch import BatchState

    state = BatchState.peek(store.root) if not isinstance(store.root, str) else None
    return [dataclasses.asdict(b) for b in state.batches.values()] if state is not None else None


def _prompts_report(store: ShardStore) -> dict[str, Any] | None:
    """The prompt plan's diversity report that ``datagen run`` wrote, if any (older runs have none)."""
    from datagen.prompts.diversity import REPORT_FILE

    try:
        if hasattr(store, "read_text"):  # an object store: None when absent
            text = store.read_text(REPORT_FILE)
        else:
            text = (store.root / REPORT_FILE).read_text()
        return json.loads(text) if text else None
    except (FileNotFoundError, json.JSONDecodeError):
        return None
