"""``datagen run`` / ``resume``: what a run is (``identity.py``: fingerprint, resume rules,
``prepare``), the driver loop and its single committer (``driver.py``), and what the loop
owns: the filter pool, the quota, rows, stats, metrics, and joining Ray (``cluster.py``).
The teacher fleet it drives is ``teachers/fleet.py``'s."""

from datagen.run.driver import execute
from datagen.run.identity import continue_run, job_meta, open_output, prepare, run_fingerprint
from datagen.run.stats import RunStats

__all__ = ["RunStats", "continue_run", "execute", "job_meta", "open_output", "prepare", "run_fingerprint"]
