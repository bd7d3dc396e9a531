"""The program that runs inside the sandbox (see ``sandbox.py``); stdlib only, Python >= 3.8.

It is started by ``sandbox.run_code`` as a fresh interpreter and reads its job (candidate
code, test code, limits, the per-run token) from an inherited pipe, so the token never
appears in argv, the environment or a file the candidate could list. Then:

1. rlimits on CPU time, address space, processes, file size, open files, core dumps;
2. new user + network + PID namespaces, where the kernel allows them unprivileged;
3. a fork: the child is PID 1 of the new PID namespace, so when it exits the kernel kills
   every process the candidate left behind; it also dies with this process (PDEATHSIG);
4. the child runs the candidate, then the tests, in one namespace dict, and writes the
   outcome to ``.result-<token>.json``. Only the original child may write it: a forked
   copy of the candidate that reaches the end exits without writing.

This file is read as text and passed with ``-c``; it is never imported by datagen.
"""

import ctypes
import errno
import json
import linecache
import os
import resource
import signal
import sys
import traceback

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1

class CPUTimeExceeded(Exception):
    """Raised on SIGXCPU (RLIMIT_CPU's soft limit); the hard limit, a second later, kills."""


def on_sigxcpu(signum, frame):
    raise CPUTimeExceeded("CPU time limit")


# Exception type -> reason code. Order matters: the first isinstance match wins.
REASONS = (
    (AssertionError, "code.test_failed"),
    (CPUTimeExceeded, "code.timeout"),
    (MemoryError, "code.memory_limit"),
    (SyntaxError, "code.syntax_error"),
    (EOFError, "code.stdin_closed"),
    (PermissionError, "code.permission_denied"),
    (RecursionError, "code.recursion_limit"),
)
NET_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EADDRNOTAVAIL,
              errno.ENETDOWN}


def reason_for(exc):
    if isinstance(exc, BlockingIOError) and exc.errno == errno.EAGAIN:
        return "code.process_limit"  # fork()/clone() refused by RLIMIT_NPROC
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "code.output_limit"  # RLIMIT_FSIZE: Python ignores SIGXFSZ, so write() says EFBIG
    if isinstance(exc, OSError) and (exc.errno in NET_ERRNOS or type(exc).__name__ == "gaierror"):
        return "code.network_denied"
    for cls, reason in REASONS:
        if isinstance(exc, cls):
            return reason
    return "code.exception"


def set_limits(lim):
    def cap(which, value):
        if value:
            resource.setrlimit(which, (value, value))

    if lim["cpu_s"]:
        resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    cap(resource.RLIMIT_AS, lim["memory_bytes"])
    cap(resource.RLIMIT_NPROC, lim["processes"])
    cap(resource.RLIMIT_FSIZE, lim["file_bytes"])
    cap(resource.RLIMIT_NOFILE, lim["open_files"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def isolate(libc):
    """New user + net + PID namespaces; returns what was achieved (for the verdict details)."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID) != 0:
        return {"netns": False, "pidns": False, "error": os.strerror(ctypes.get_errno())}
    try:  # keep our own ids inside the namespace (else they read as 65534)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write("%d %d 1" % (uid, uid))
        with open("/proc/self/gid_map", "w") as f:
            f.write("%d %d 1" % (gid, gid))
    except OSError:
        pass
    return {"netns": True, "pidns": True}


def run_candidate(job, result_path, me, isolation):
    outcome = {"token": job["token"], "passed": False, "reason": "code.exception", "details": "",
               "isolation": isolation}
    try:
        signal.signal(signal.SIGXCPU, on_sigxcpu)  # PID 1 ignores signals it has no handler for
        scope = {"__name__": "__main__", "__builtins__": __builtins__}
        for name in ("solution.py", "tests.py"):  # so tracebacks show the failing line
            src = job["code"] if name == "solution.py" else job["tests"]
            linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        exec(compile(job["code"], "solution.py", "exec"), scope)
        exec(compile(job["tests"], "tests.py", "exec"), scope)
        outcome.update(passed=True, reason="ok")
    except SystemExit as exc:  # the candidate (or a test) called sys.exit(): not a pass
        outcome.update(reason="code.exited", details="sys.exit(%r)" % (exc.code,))
    except BaseException as exc:  # noqa: BLE001 -- every failure of the candidate is a verdict
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f"{fr.filename}:{fr.lineno}: {fr.line}" for fr in reversed(tb)
                      if fr.filename in ("tests.py", "solution.py")), "")
        outcome.update(reason=reason_for(exc),
                       details=("%s: %s" % (type(exc).__name__, exc))[:300] + (" at " + where if where else ""))
    if os.getpid() != me:  # a forked copy of the candidate got here: only the original reports
        os._exit(1)
    for stream in (sys.stdout, sys.stderr):  # os._exit below skips the usual flush
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 -- e.g. EFBIG: the output cap was hit
            pass
    fd = os.open(result_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.write(fd, json.dumps(outcome).encode())
    os.close(fd)
    os._exit(0)  # skip atexit hooks the candidate may have registered


def main():
    fd = int(sys.argv[1])
    chunks = []
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        chunks.append(b)
    os.close(fd)
    job = json.loads(b"".join(chunks).decode())
    libc = ctypes.CDLL(None, use_errno=True)
    set_limits(job["limits"])
    lim_cpu = job["limits"]["cpu_s"]
    iso = isolate(libc) if job["isolate"] else {"netns": False, "pidns": False}
    result_path = ".result-%s.json" % job["token"]
    pid = os.fork()
    if pid == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the harness, whoever kills it
        run_candidate(job, result_path, os.getpid(), iso)
    del job
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        if sig == signal.SIGKILL and lim_cpu and used.ru_utime + used.ru_stime >= lim_cpu:
            sig = signal.SIGXCPU  # killed by RLIMIT_CPU's hard limit: report it as such
        os._exit(128 + sig)
    os._exit(os.WEXITSTATUS(status))


main()
