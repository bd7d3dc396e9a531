"""``datagen submit`` and ``datagen jobs``: send a job file to a Ray cluster through the
Ray Jobs API (``ray.job_submission.JobSubmissionClient``, from ``ray[default]``).

What a submission carries:

- the **working directory** (default: the current one), zipped by Ray, minus
  ``DEFAULT_EXCLUDES`` (virtualenvs, outputs, ``.git``, caches) and whatever its
  ``.gitignore`` lists. The job file must be inside it: the entrypoint is
  ``python -m datagen run <job file, relative to it>``, run on the head node from the
  unpacked copy, so relative template paths resolve exactly as on the laptop;
- a **runtime environment**: pip requirements (``--requirements``), a YAML template
  (``--runtime-env``, see cluster/runtime-env.yaml) and plain ``--env NAME=VALUE``;
- the **names** of the secrets the job needs (each teacher's ``api_key_env``), in the
  job's metadata and in ``DATAGEN_SECRET_ENV``. Never their values: the values live on
  the cluster (the nodes' environment, set from a Kubernetes Secret or the cloud's
  secret store at node start; see cluster/README.md), and the job's own
  ``datagen run`` refuses to start, naming the variable, when one is missing there.
  ``--env`` refuses names that are secrets, so a value cannot ride along by mistake.

Authentication to the job server is Ray's own (Ray >= 2.52 token auth): the client
reads ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` /
``~/.ray/auth_token`` from the submitting shell; datagen never sees or sends the token.

A driver that stopped (``datagen jobs stop``, a lost head, an engine that ran out of
memory) leaves a resumable output: ``datagen submit JOB --resume`` sends
``datagen resume OUTPUT --job JOB``, which finishes it with the job file's teacher
settings (replicas, engine memory, rate limits) and refuses changes to what a row is.

A **train file** (one with a ``student:``, see datagen/train/config.py) is sent the same
way: the entrypoint is ``python -m datagen train <file> --quiet`` (``--resume`` adds
``--resume``), whose driver starts Ray Train's workers on the cluster
(datagen/train/ray_train.py). Its ``data.path`` and ``output`` must be absolute paths
outside the uploaded folder, on storage every node sees (the job reads the committed
rows and writes checkpoints there); ``--output`` is refused for it (set ``output:``).

Not covered: a driver killed with its cluster (Ray jobs die with the cluster; the
output is resumable, as above, once a cluster is back); uploading a
working directory larger than Ray's package limit (500 MiB by default).
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datagen.errors import DatagenError, MissingExtra

DEFAULT_EXCLUDES = [
    ".venv", "venv", ".git", "out", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".ipynb_checkpoints", "*.egg-info", "build", "dist", "node_modules",
]
# Names that hold credentials by convention: refused in --env, whose values travel.
_SECRETISH = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.I)
_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}


@dataclass(frozen=True)
class Submission:
    job_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    warnings: tuple[str, ...] = ()


def client(address: str | None) -> Any:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise MissingExtra("ray[default]", "cpu", "datagen submit / jobs") from None
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, ValueError, auth errors: one line each
        where = address or "$RAY_API_SERVER_ADDRESS / $RAY_ADDRESS"
        raise DatagenError(f"cannot reach the Ray job server at {where}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def secret_names(job: Any) -> list[str]:
    return sorted({t.api_key_env for t in job.teachers if getattr(t, "api_key_env", None)})


def parse_env(pairs: list[str], *, secrets: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _NAME.match(name):
            # Only the part before '=' is echoed: the value may be a secret.
            raise DatagenError(f"--env {name if sep else '...'}: expected NAME=VALUE with NAME in upper case")
        if name in secrets or _SECRETISH.search(name):
            raise DatagenError(
                f"--env {name}: looks like a secret; its value would travel with the job. Set it on the "
                "cluster instead (see cluster/README.md); the submission carries only its name"
            )
        env[name] = value
    return env


def build(job_file: str | Path, *, working_dir: str | Path | None = None, output: str | None = None,
          requirements: str | Path | None = None, runtime_env_file: str | Path | None = None,
          env: list[str] = (), python: str = "python", job_id: str | None = None,
          resume: bool = False) -> Submission:
    """Check the job locally and assemble what ``submit_job`` gets. Nothing is sent.
    ``resume``: the entrypoint continues the run already in the output
    (``datagen resume OUTPUT --job JOB``: the same rows, this file's teacher settings)."""
    from datagen.config import load_job

    wd = Path(working_dir or Path.cwd()).resolve()
    job_path = Path(job_file).resolve()
    if not wd.is_dir():
        raise DatagenError(f"working directory not found: {wd}")
    try:
        rel_job = job_path.relative_to(wd)
    except ValueError:
        raise DatagenError(f"the job file {job_path} is outside the working directory {wd}, which is what "
                           "gets uploaded; run from a folder that contains it or pass --working-dir") from None
    if is_train_file(job_path):
        if output is not None:
            raise DatagenError(f"{job_path}: --output applies to generation jobs; set output: in the train file")
        cfg = _check_train(job_path, wd)
        args = [python, "-m", "datagen", "train", rel_job.as_posix(), "--quiet"] + (["--resume"] if resume else [])
        runtime_env = _runtime_env(wd, secrets=[], requirements=requirements, runtime_env_file=runtime_env_file,
                                   env=env)
        metadata = {"datagen_job": cfg.name, "datagen_job_file": rel_job.as_posix(), "datagen_kind": "train",
                    "datagen_output": str(cfg.output), "datagen_secret_env": ""}
        return Submission(job_id=job_id or f"datagen-train-{cfg.name}-{uuid.uuid4().hex[:8]}",
                          entrypoint=shlex.join(args), runtime_env=runtime_env, metadata=metadata)
    job = load_job(job_path, output=output)  # bad fields fail here, before anything is sent
    _check_prompts(job)
    warnings = []
    if not job.prompts.template.is_relative_to(wd):
        warnings.append(f"prompts.template {job.prompts.template} is outside the uploaded folder: "
                        "it must exist at that path on the cluster's head node")
    out = job.output.path
    if not isinstance(out, str) and out.is_relative_to(wd):
        raise DatagenError(
            f"{job_path}: output.path {out} is inside the uploaded working directory; on the cluster that is "
            "a temporary copy Ray deletes. Use s3://bucket/prefix or an absolute path on shared storage "
            "(output.path or --output)"
        )
    secrets = secret_names(job)
    runtime_env = _runtime_env(wd, secrets=secrets, requirements=requirements, runtime_env_file=runtime_env_file,
                               env=env)
    if resume:
        args = [python, "-m", "datagen", "resume", str(out), "--job", rel_job.as_posix(), "--quiet"]
    else:
        args = [python, "-m", "datagen", "run", rel_job.as_posix(), "--quiet"]
        if output is not None:
            args += ["--output", str(out)]
    metadata = {"datagen_job": job.name, "datagen_job_file": rel_job.as_posix(),
                "datagen_output": str(out), "datagen_secret_env": ",".join(secrets)}
    return Submission(job_id=job_id or f"datagen-{job.name}-{uuid.uuid4().hex[:8]}",
                      entrypoint=shlex.join(args), runtime_env=runtime_env, metadata=metadata,
                      warnings=tuple(warnings))


def is_train_file(path: Path) -> bool:
    """A train file has a ``student:`` (a job file never does)."""
    from datagen.config import read_yaml

    doc = read_yaml(path, what="job file")
    return isinstance(doc, dict) and "student" in doc


def _check_train(path: Path, wd: Path) -> Any:
    """The train file, validated as ``datagen train`` would; its data and output must be
    shared storage, not the uploaded (temporary, on the cluster) folder."""
    from datagen.storage.shards import is_url
    from datagen.train.config import load_train

    cfg = load_train(path)
    for what, where in (("data.path", cfg.data.path), ("output", cfg.output)):
        if not is_url(where) and Path(where).is_relative_to(wd):
            raise DatagenError(
                f"{path}: {what} {where} is inside the uploaded working directory; on the cluster that is a "
                "temporary copy Ray deletes (and outputs are not uploaded). Use an absolute path on storage "
                "every node sees")
    return cfg


def _runtime_env(wd: Path, *, secrets: list[str], requirements: str | Path | None,
                 runtime_env_file: str | Path | None, env: list[str]) -> dict[str, Any]:
    from datagen.config import read_yaml

    runtime_env: dict[str, Any] = {}
    if runtime_env_file:
        template = read_yaml(Path(runtime_env_file), what="runtime-env file")
        if not isinstance(template, dict):
            raise DatagenError(f"{runtime_env_file}: a runtime env must be a mapping")
        runtime_env.update(template)
    env_vars = {k: str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
    for name in env_vars:
        if name in secrets or _SECRETISH.search(name):
            raise DatagenError(f"{runtime_env_file}: env_vars.{name} looks like a secret; set it on the cluster")
    env_vars.update(parse_env(list(env), secrets=secrets))
    env_vars["DATAGEN_SECRET_ENV"] = ",".join(secrets)
    runtime_env["env_vars"] = env_vars
    runtime_env["working_dir"] = str(wd)
    runtime_env["excludes"] = sorted(set(runtime_env.get("excludes") or []) | set(DEFAULT_EXCLUDES))
    if requirements:
        req = Path(requirements)
        try:
            lines = [ln.strip() for ln in req.read_text().splitlines()]
        except OSError as exc:
            raise DatagenError(f"requirements file unreadable: {req}: {exc}") from None
        runtime_env["pip"] = sorted(set(runtime_env.get("pip") or []) |
                                    {ln for ln in lines if ln and not ln.startswith("#")})
    return runtime_env


def _check_prompts(job: Any) -> None:
    """What ``run.prepare`` checks, minus the secrets: those are the cluster's to have."""
    from datagen import licenses
    from datagen.prompts import PromptStream

    stream = PromptStream(job, run_fingerprint="")
    licenses.resolve_job(job, template=stream.template)


def submit(sub: Submission, *, address: str | None) -> str:
    c = client(address)
    try:
        return c.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env, metadata=sub.metadata,
                            submission_id=sub.job_id)
    except Exception as exc:  # noqa: BLE001 - the job server's refusal, as one line
        raise DatagenError(f"the Ray job server refused the job: {_one_line(exc)}") from None


def status(job_id: str, *, address: str | None) -> dict[str, Any]:
    c = client(address)
    try:
        info = c.get_job_info(job_id)
    except Exception as exc:  # noqa: BLE001
        raise DatagenError(f"job {job_id}: {_one_line(exc)}") from None
    return {"job_id": job_id, "status": str(getattr(info.status, "value", info.status)),
            "message": info.message, "entrypoint": info.entrypoint, "metadata": info.metadata or {},
            "start_time": info.start_time, "end_time": info.end_time}


def logs(job_id: str, *, address: str | None) -> str:
    c = client(address)
    try:
        return c.get_job_logs(job_id)
    except Exception as exc:  # noqa: BLE001
        raise DatagenError(f"job {job_id}: {_one_line(exc)}") from None


def follow(job_id: str, *, address: str | None, out: Any = None) -> str:
    """Stream the job's logs until it ends; return its final status."""
    c = client(address)
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001
        raise DatagenError(f"job {job_id}: lost the log stream: {_one_line(exc)}") from None
    final = c.get_job_status(job_id)
    return str(getattr(final, "value", final))


def stop(job_id: str, *, address: str | None) -> bool:
    c = client(address)
    try:
        return bool(c.stop_job(job_id))
    except Exception as exc:  # noqa: BLE001
        raise DatagenError(f"job {job_id}: {_one_line(exc)}") from None
