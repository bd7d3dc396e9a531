"""Run untrusted Python (a teacher's code answer) against unit tests, and say PASS or FAIL.

What each run gets:

- a fresh interpreter (``python -I``) in its own session and process group, started
  without ``preexec_fn`` (safe from a threaded driver or Ray actor);
- a private temp space: with a mount namespace, one tmpfs on ``/tmp`` (also bound on
  ``/var/tmp``, ``/dev/shm``, ``/run/lock``) capped in bytes and files (``tmp_bytes``,
  ``tmp_files``: ``code.disk_limit`` past them), the working directory, ``HOME`` and
  ``TMPDIR`` inside it; it vanishes with the run. Without one: a host temp dir as cwd,
  ``HOME`` and ``TMPDIR``, removed afterwards, and (as root) whatever the run's uid left at
  the top of the shared temp dirs is deleted after the run;
- a scrubbed environment: ``PATH``, ``HOME``, ``TMPDIR``/``TMP``/``TEMP``, ``LANG`` and
  nothing else, so API keys in the host's environment are not there to read;
- stdin from ``/dev/null``; stdout and stderr go to files in a host-private directory,
  so no pipe can fill and block, and ``RLIMIT_FSIZE`` caps what they can grow to;
- rlimits on CPU seconds, address space, processes, file size, open files, core dumps;
- a wall-clock timeout that SIGKILLs the whole process group;
- new user, network, PID and mount namespaces where the kernel allows them unprivileged
  (the network namespace has only a downed loopback: no connection goes anywhere,
  127.0.0.1 included; the candidate runs as PID 1 of the new PID namespace, so everything
  it forks is killed when it exits, setsid() and double forks included);
- when the host runs as root, a per-run unprivileged uid (random, >= 2**20): host files
  are not writable, RLIMIT_NPROC really applies (root ignores it), and every process
  with that uid is swept away at the end, whatever session it moved to.

The verdict cannot be written by the candidate (``_harness.py`` has the details): the
program runs in its own process, forked before the tests and the run's token are read,
with every fd but stdio and two RPC pipes closed. The tests run in the judge process,
which the candidate cannot signal (PID namespace) or read (non-dumpable), on values that
cross as plain data, so a replaced ``json``/``os``/``builtins``, a frame or ``gc`` walk,
an ``__eq__`` that always says yes, or a forged file or pipe write gives nothing. The
judge counts the asserts it runs: tests that ran none are ``code.no_tests_ran``.

What it does NOT cover (say so before you run hostile code at scale):

- It is not a security boundary against a kernel exploit or a determined escape: a
  process of the run's uid that finds a way into the judge (a kernel bug; a host without
  Yama or non-dumpable semantics) could still forge its verdict. Use gVisor/Firecracker/
  nsjail for code you must assume is out to get you.
- Tests that need candidate objects beyond calls, attributes, indexing, ``len`` and
  iteration (``isinstance`` against a candidate class, comparing two candidate objects,
  passing a lambda to the candidate) fail (``code.unsupported_test`` for the lambda); a
  mutated argument is seen only for a top-level ``list``/``dict``/``set``.
- The filesystem is not hidden: the candidate can read whatever its uid may read
  (world-readable files). Without a mount namespace there is no cap on the total bytes
  or files written (only ``RLIMIT_FSIZE`` per file), and files left in other users'
  world-writable subdirectories, or by a non-root host's own uid, are not removed.
- Without user namespaces (some kernels/containers forbid them) there is no network, PID
  or mount isolation: ``isolation()`` says what this host gives, and a candidate's daemon
  that leaves the process group outlives the run unless the host is root (the uid sweep);
  the candidate can also kill the judge (a FAIL, never a pass).
- RLIMIT_AS limits virtual memory, not RSS; there is no cgroup, so no CPU share or
  memory accounting across the processes of one run beyond per-process limits. The
  private tmpfs is RAM: up to ``tmp_bytes`` per concurrent run.
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
_SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
_HARNESS_FAILED = 70  # the harness's own exit status when it (not the candidate) broke


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, whole process group
    cpu_s: int = 10
    memory_bytes: int = 1 << 30
    processes: int = 64
    file_bytes: int = 16 << 20  # per file, stdout/stderr included
    open_files: int = 64
    tmp_bytes: int = 64 << 20  # all files of the run together (its private tmpfs, RAM-backed)
    tmp_files: int = 4096  # and how many (inodes, directories included)


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
             isolate: bool = True, entry_point: str | None = None) -> Result:
    """Run ``code``, then ``tests`` against it (Python source; a failing ``assert`` fails,
    and tests that run no ``assert`` at all fail as ``code.no_tests_ran``). With
    ``entry_point``, tests that define ``check(candidate)`` get it called with that
    function of the program (HumanEval-style).

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
    fds: list[int] = []
    try:
        if uid is not None:
            os.chown(work, uid, uid)
        out_path, err_path = private / "stdout", private / "stderr"
        job_r, job_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        fds += [job_r, job_w, verdict_r, verdict_w]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
               **{var: str(work) for var in ("HOME", "TMPDIR", "TMP", "TEMP")}}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-c", _HARNESS, str(job_r), str(verdict_w)], cwd=work, env=env,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(job_r, verdict_w),
                    start_new_session=True, close_fds=True,
                    **({"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}),
                )
            except OSError as exc:
                raise SandboxError(f"could not start the sandbox interpreter {python}: {exc}") from None
        for fd in (job_r, verdict_w):  # the harness's ends
            os.close(fd)
            fds.remove(fd)
        # Two frames: the harness forks the candidate's process between them, so the
        # tests and the token never exist in the memory the candidate's code runs in.
        lim = {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_bytes, "processes": limits.processes,
               "file_bytes": limits.file_bytes, "open_files": limits.open_files, "tmp_bytes": limits.tmp_bytes,
               "tmp_files": limits.tmp_files}
        _send_frames(job_w, [{"code": code, "isolate": isolate, "limits": lim},
                             {"token": token, "tests": tests, "entry_point": entry_point}])
        os.close(job_w)
        fds.remove(job_w)
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
        outcome = None if timed_out else _read_verdict(verdict_r, token)
        if uid is not None and not (outcome or {}).get("isolation", {}).get("private_tmp"):
            _sweep_files(uid)
        seconds = time.monotonic() - started
        tail = _tail(out_path)
        if timed_out:
            return Result(False, "code.timeout", f"wall clock > {limits.timeout_s:g} s", tail, seconds)
        if outcome is None:
            if rc == _HARNESS_FAILED:
                raise SandboxError(f"the sandbox harness failed: {_tail(err_path, 600)}")
            return Result(False, _no_result_reason(rc), f"exit status {rc}; stderr: {_tail(err_path, 300)}",
                          tail, seconds)
        return Result(outcome.get("passed") is True, str(outcome.get("reason")), str(outcome.get("details", "")),
                      tail, seconds, outcome.get("isolation") or {})
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(private, ignore_errors=True)
        if uid is not None:
            _release_uid(uid)


def _send_frames(fd: int, frames: list[dict[str, Any]]) -> None:
    try:
        for frame in frames:
            data = json.dumps(frame).encode()
            os.write(fd, len(data).to_bytes(4, "big"))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    except BrokenPipeError:
        pass  # the harness died before reading: reported as its exit status


def _read_verdict(fd: int, token: str) -> dict[str, Any] | None:
    """The judge's verdict from its pipe (only the judge held the write end); None when
    it wrote none (it was killed) or wrote something that is not one."""
    os.set_blocking(fd, False)
    chunks = []
    try:
        while sum(map(len, chunks)) < (1 << 20):
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
    except BlockingIOError:
        pass
    try:
        data = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("token") == token else None


def _sweep_files(uid: int) -> None:
    """Without a private /tmp (no mount namespace), remove what the run's uid left at the
    top of the shared temp dirs. Deeper files in other users' world-writable subdirs stay."""
    for d in _SHARED_TMP:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if e.is_dir(follow_symlinks=False):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    os.unlink(e.path)
            except OSError:
                continue


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


@lru_cache(maxsize=1)
def isolation() -> dict[str, Any]:
    """What this host gives the sandbox: ``{"netns", "pidns", "private_tmp", "uid_switch"}``, each a bool."""
    res = run_code("", "assert True", limits=Limits(timeout_s=20))
    if not res.passed:
        raise SandboxError(f"the sandbox cannot run even an empty program: {res.reason} {res.details}")
    return {**res.isolation, "uid_switch": os.geteuid() == 0}
