"""Run untrusted Python (a teacher's code answer) against unit tests, and say PASS or FAIL.

What each run gets:

- a fresh interpreter (``python -I``) in its own session and process group, started
  without ``preexec_fn`` (safe from a threaded driver or Ray actor);
- a new temporary working directory, removed afterwards;
- a scrubbed environment: ``PATH``, ``HOME`` (the temp dir), ``LANG`` and nothing else,
  so API keys in the host's environment are not there to read;
- stdin from ``/dev/null``; stdout and stderr go to files in a host-private directory,
  so no pipe can fill and block, and ``RLIMIT_FSIZE`` caps what they can grow to;
- rlimits on CPU seconds, address space, processes, file size, open files, core dumps;
- a wall-clock timeout that SIGKILLs the whole process group;
- new user, network and PID namespaces where the kernel allows them unprivileged (the
  network namespace has only a downed loopback: no connection goes anywhere, 127.0.0.1
  included; the candidate runs as PID 1 of the new PID namespace, so everything it forks
  is killed when it exits, setsid() and double forks included);
- when the host runs as root, a per-run unprivileged uid (random, >= 2**20): host files
  are not writable, RLIMIT_NPROC really applies (root ignores it), and every process
  with that uid is swept away at the end, whatever session it moved to.

The verdict is read from ``.result-<token>.json``, where ``token`` is random per run and
reaches the harness through a pipe, never argv, the environment or stdout. A candidate
that prints "PASS" and exits 0 writes no result file, so it fails.

What it does NOT cover (say so before you run hostile code at scale):

- It is not a security boundary against code that *targets this harness*: the candidate
  runs in the same interpreter as the test runner, so code that walks the interpreter's
  frames can find the token, or can override ``__eq__`` to pass weak asserts. It stops
  mistakes, runaway programs and the usual escapes, not a determined attacker; use
  gVisor/Firecracker/nsjail for that.
- The filesystem is not hidden: the candidate can read whatever its uid may read
  (world-readable files), and can write into world-writable places (``/tmp``,
  ``/dev/shm``) within RLIMIT_FSIZE per file; there is no disk quota or mount namespace.
- Without user namespaces (some kernels/containers forbid them) there is no network or
  PID isolation: ``isolation()`` says what this host gives, and a candidate's daemon that
  leaves the process group outlives the run unless the host is root (the uid sweep).
- RLIMIT_AS limits virtual memory, not RSS; there is no cgroup, so no CPU share or
  memory accounting across the processes of one run beyond per-process limits.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

_HARNESS = (Path(__file__).parent / "_harness.py").read_text()
_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, whole process group
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    processes: int = 64
    file_bytes: int = 16 << 20  # per file, stdout/stderr included
    open_files: int = 64


@dataclass
class Result:
    passed: bool
    reason: str  # "ok" or a code.* reason
    details: str = ""
    stdout_tail: str = ""
    seconds: float = 0.0
    isolation: dict[str, Any] = field(default_factory=dict)


class SandboxError(RuntimeError):
    """The sandbox itself broke (could not start, lost its result): infrastructure, never a verdict."""


def _world_executable(path: str) -> bool:
    """True when any uid could exec ``path`` (every directory on the way is o+x)."""
    p = Path(os.path.realpath(path))
    try:
        if not os.stat(p).st_mode & stat.S_IXOTH:
            return False
        return all(os.stat(d).st_mode & stat.S_IXOTH for d in p.parents)
    except OSError:
        return False


@lru_cache(maxsize=1)
def default_python() -> str:
    """The interpreter the candidate runs in. As root we drop to an unprivileged uid, which
    must be able to exec it (a pyenv under /root is private), so fall back to the system
    python3 when ``sys.executable`` is not reachable by others."""
    if os.geteuid() != 0 or _world_executable(sys.executable):
        return sys.executable
    for p in _SYSTEM_PYTHONS:
        if _world_executable(p):
            return p
    raise SandboxError("running as root, and no python3 that an unprivileged uid can execute "
                       f"(tried {sys.executable}, {', '.join(_SYSTEM_PYTHONS)}); set python= explicitly")


_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _take_uid() -> int:
    with _uid_lock:
        while True:
            uid = (1 << 20) + secrets.randbelow(1 << 20)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _sweep_uid(uid: int) -> int:
    """SIGKILL every process owned by ``uid`` until none is left; returns how many."""
    killed = 0
    for _ in range(50):
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.stat(f"/proc/{name}").st_uid == uid:
                        found.append(int(name))
                except OSError:
                    continue
        if not found:
            return killed
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(0.01)
    return killed


def _tail(path: Path, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_code(code: str, tests: str, *, limits: Limits = Limits(), python: str | None = None,
             isolate: bool = True) -> Result:
    """Run ``code`` then ``tests`` (Python source; a failing ``assert`` fails) in the sandbox.

    Raises ``SandboxError`` only when the sandbox itself fails; anything the candidate
    does, including crashing, hanging or exiting early, is a FAIL ``Result``.
    """
    python = python or default_python()
    token = secrets.token_hex(16)
    as_root = os.geteuid() == 0
    uid = _take_uid() if as_root else None
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="datagen-sbx-"))
    private = Path(tempfile.mkdtemp(prefix="datagen-sbx-out-"))  # 0700, host only
    read_fd = write_fd = None
    try:
        if uid is not None:
            os.chown(work, uid, uid)
        out_path, err_path = private / "stdout", private / "stderr"
        read_fd, write_fd = os.pipe()
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-c", _HARNESS, str(read_fd)], cwd=work, env=env,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(read_fd,),
                    start_new_session=True, close_fds=True,
                    **({"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}),
                )
            except OSError as exc:
                raise SandboxError(f"could not start the sandbox interpreter {python}: {exc}") from None
        os.close(read_fd)
        read_fd = None
        job = {"token": token, "code": code, "tests": tests, "isolate": isolate,
               "limits": {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_bytes,
                          "processes": limits.processes, "file_bytes": limits.file_bytes,
                          "open_files": limits.open_files}}
        try:
            with os.fdopen(write_fd, "wb") as w:
                write_fd = None
                w.write(json.dumps(job).encode())
        except BrokenPipeError:
            pass  # the harness died before reading: reported below as its exit status
        timed_out = False
        try:
            rc = proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        # Whatever happened, nothing of the run survives it: the group, then (as root) the uid.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        rc = proc.wait()
        if uid is not None:
            _sweep_uid(uid)
        seconds = time.monotonic() - started
        tail = _tail(out_path)
        if timed_out:
            return Result(False, "code.timeout", f"wall clock > {limits.timeout_s:g} s", tail, seconds)
        outcome = _read_result(work / f".result-{token}.json", token)
        if outcome is None:
            return Result(False, _no_result_reason(rc), f"exit status {rc}; stderr: {_tail(err_path, 300)}",
                          tail, seconds)
        return Result(bool(outcome.get("passed")), str(outcome.get("reason")), str(outcome.get("details", "")),
                      tail, seconds, outcome.get("isolation") or {})
    finally:
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
        if uid is not None:
            _release_uid(uid)


def _no_result_reason(rc: int) -> str:
    """The harness exits 128+signal when the candidate's process was killed by a signal."""
    sig = rc - 128 if rc > 128 else -rc if rc < 0 else 0
    if sig == signal.SIGXCPU:
        return "code.timeout"  # RLIMIT_CPU
    if sig == signal.SIGXFSZ:
        return "code.output_limit"
    if sig:
        return "code.killed"
    return "code.no_result"  # exited (0 or not) without the harness writing a verdict


def _read_result(path: Path, token: str) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(1 << 20)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("token") == token else None


@lru_cache(maxsize=1)
def isolation() -> dict[str, Any]:
    """What this host gives the sandbox: ``{"netns": bool, "pidns": bool, "uid_switch": bool}``."""
    res = run_code("", "", limits=Limits(timeout_s=20))
    if not res.passed:
        raise SandboxError(f"the sandbox cannot run even an empty program: {res.reason} {res.details}")
    return {**res.isolation, "uid_switch": os.geteuid() == 0}
