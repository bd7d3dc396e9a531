"""``datagen report OUT``: one self-contained HTML page that shows a run at a glance.

``collect.py`` (with ``scan.py``) reads an output into a small dict, streaming the shards'
columns (memory flat in dataset size); ``plots.py`` draws its figures as inline SVG;
``page.py`` renders the page (Jinja2, every string escaped, no script, nothing fetched
when it is viewed). ``datagen run`` and ``resume`` write ``OUT/report.html`` at the end
(``after_run``: a report that cannot be written costs one warning line, never the run).

A new section: a key in ``collect.collect`` (None when absent), a figure in ``plots.py``,
an empty-state line in ``page.EMPTY`` and a block in ``page.html.j2``. The ``routing``
section draws a ``datagen route report`` (``--routing DIR``, else found under the
``--train`` output's or the output's own ``route/``).

Not covered: figures of work that the output does not record (an engine's own queue,
HTTP requests in flight); rows written after the report (it is a snapshot, rewritten by
each run, resume or ``datagen report``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPORT_FILE = "report.html"


def write_report(root: Path | str, dest: Path | None = None, *, output: Any = None, train: Path | None = None,
                 eval_file: Path | None = None, routing: Path | None = None) -> str:
    """Write the report of the output at ``root`` to ``dest`` (default ``root/report.html``,
    an object in the store for ``s3://``); returns where it went."""
    from datagen.report.collect import collect
    from datagen.report.page import render
    from datagen.storage import open_store
    from datagen.storage.shards import atomic_write_text, is_url

    store = open_store(root if is_url(root) else Path(root), output)
    html = render(collect(store, train=train, eval_file=eval_file, routing_file=routing))
    if dest is not None:
        atomic_write_text(Path(dest), html)
        return str(dest)
    if hasattr(store, "put_text"):  # an object store
        store.put_text(REPORT_FILE, html)
        return f"{store.root}/{REPORT_FILE}"
    atomic_write_text(Path(store.root) / REPORT_FILE, html)
    return str(Path(store.root) / REPORT_FILE)


def after_run(root: Path | str, output: Any, warn: Any) -> str | None:
    """``write_report`` at the end of ``datagen run`` / ``resume``: a failure is one
    warning line on ``warn`` (a rich Console), never the run's."""
    try:
        return write_report(root, output=output)
    except Exception as exc:  # noqa: BLE001 - the rows are committed; a page must not fail the run
        warn.print(f"warning: no report written ({type(exc).__name__}: {exc}); "
                   f"`datagen report {root}` tries again", soft_wrap=True, markup=False, highlight=False)
        return None
