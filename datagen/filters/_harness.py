"""The program that runs inside the sandbox (see ``sandbox.py``); stdlib only, Python >= 3.8.

It is started by ``sandbox.run_code`` as a fresh interpreter with two inherited pipes:
the job comes in on one, the verdict goes out on the other. Two processes then share
the work, and only one of them ever runs candidate code:

- the *judge* (this process) sets the rlimits, enters new user + network + PID + mount
  namespaces where the kernel allows it (a private, size-capped tmpfs on ``/tmp``,
  ``/var/tmp``, ``/dev/shm`` and ``/run/lock``), makes itself non-dumpable (no other
  process of its uid may read its memory or open its fds through ``/proc``), and forks;
- the *candidate* process (the fork; PID 1 of the new PID namespace) closes every fd but
  stdio and its two RPC pipes, drops its capabilities, and only then runs the program.
  It never holds the tests, the verdict pipe or the run's token: the judge reads those
  from the job pipe *after* the fork.
- The judge runs the tests. A name the program defined reaches them as plain data
  (exact ``int``/``float``/``str``/``bytes``/``list``/``tuple``/``dict``/``set``...
  rebuilt by the judge's own JSON decoder) or as a proxy whose calls, attribute reads,
  indexing and iteration are forwarded to the candidate process and whose results come
  back as data again. So ``==`` and every assert are computed by the judge, on values
  the candidate could not dress up (an ``__eq__`` that always says yes never crosses).
- Asserts are counted as they run: tests that ran none (``check`` defined, never
  called) are ``code.no_tests_ran``, not a pass. With an entry point, the judge calls
  ``check(<entry point>)`` itself, as the benchmarks that ship such tests expect.

The judge writes the verdict (with the run's token) to its pipe and kills the candidate.

This file is read as text and passed with ``-c``; it is never imported by datagen.

Long: the interpreter gets it as one ``-c`` string, so it cannot be split into modules.
"""

import ast
import builtins
import ctypes
import errno
import json
import linecache
import os
import resource
import signal
import sys
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
SHARED_TMP = ("/var/tmp", "/dev/shm", "/run/lock")  # bound to the run's own /tmp
MAX_FRAME = 64 << 20
HARNESS_FAILED = 70  # the judge broke: infrastructure, never a verdict


class CPUTimeExceeded(Exception):
    """Raised on SIGXCPU (RLIMIT_CPU's soft limit); the hard limit, a second later, kills."""


class CandidateError(Exception):
    """An exception the candidate raised whose type is not a builtin (rebuilt by name)."""


class CandidateExit(Exception):
    """The candidate called sys.exit()."""


class CandidateGone(Exception):
    """The candidate process ended, or answered something that is not the protocol."""


class UnsupportedTest(Exception):
    """The tests did something values-as-data cannot carry (pass a lambda to the candidate)."""


class MissingEntryPoint(Exception):
    pass


class NoTestsRan(Exception):
    pass


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
    (CandidateExit, "code.exited"),
    (UnsupportedTest, "code.unsupported_test"),
    (MissingEntryPoint, "code.missing_entry_point"),
    (NoTestsRan, "code.no_tests_ran"),
)
NET_ERRNOS = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EADDRNOTAVAIL,
              errno.ENETDOWN}


def reason_for(exc):
    if isinstance(exc, BlockingIOError) and exc.errno == errno.EAGAIN:
        return "code.process_limit"  # fork()/clone() refused by RLIMIT_NPROC
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        return "code.output_limit"  # RLIMIT_FSIZE: Python ignores SIGXFSZ, so write() says EFBIG
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "code.disk_limit"  # the run's private tmpfs is full (bytes or files)
    if isinstance(exc, OSError) and (exc.errno in NET_ERRNOS or type(exc).__name__ == "gaierror"):
        return "code.network_denied"
    for cls, reason in REASONS:
        if isinstance(exc, cls):
            return reason
    return "code.exception"


# ----------------------------------------------------------------------------- framing

def read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        b = os.read(fd, min(n - len(buf), 1 << 20))
        if not b:
            return None
        buf += b
    return buf


def send(fd, obj):
    data = json.dumps(obj, separators=(",", ":")).encode()
    msg = len(data).to_bytes(4, "big") + data
    while msg:
        msg = msg[os.write(fd, msg):]


def recv(fd):
    head = read_exact(fd, 4)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    if n > MAX_FRAME:
        raise CandidateGone("a reply of %d bytes" % n)
    body = read_exact(fd, n)
    if body is None:
        return None
    return json.loads(body)


# ----------------------------------------------------------------------------- values as data

CONTAINERS = {tuple: "t", set: "s", frozenset: "f"}


def encode(x, other, depth=0):
    """Plain data as JSON (tagged where JSON has no type); anything else goes to ``other``.
    Exact types only: a subclass (with its own ``__eq__``) is not data."""
    t = type(x)
    if x is None or t is bool or t is int or t is float or t is str:
        return x
    if depth > 200:
        raise ValueError("nested too deep")
    if t is list:
        return [encode(v, other, depth + 1) for v in x]
    if t in CONTAINERS:
        return {CONTAINERS[t]: [encode(v, other, depth + 1) for v in x]}
    if t is dict:
        return {"d": [[encode(k, other, depth + 1), encode(v, other, depth + 1)] for k, v in x.items()]}
    if t is bytes:
        return {"b": x.decode("latin-1")}
    if t is complex:
        return {"c": [x.real, x.imag]}
    return other(x, depth)


def decode(v, ref):
    """The inverse of ``encode``, strict: a value that is not one of its shapes raises."""
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if t is list:
        return [decode(x, ref) for x in v]
    if t is not dict or len(v) != 1:
        raise CandidateGone("not a value: %s" % t.__name__)
    (tag, body), = v.items()
    if tag == "t":
        return tuple(decode(x, ref) for x in body)
    if tag == "s":
        return set(decode(x, ref) for x in body)
    if tag == "f":
        return frozenset(decode(x, ref) for x in body)
    if tag == "d":
        return dict((decode(k, ref), decode(x, ref)) for k, x in body)
    if tag == "b" and type(body) is str:
        return body.encode("latin-1")
    if tag == "c":
        return complex(float(body[0]), float(body[1]))
    if tag in ("h", "m"):
        return ref(tag, body)
    raise CandidateGone("not a value: tag %r" % (tag,))


# ----------------------------------------------------------------------------- candidate side

def describe(exc):
    """[type name, message, errno, where] of an exception in the candidate process."""
    try:
        msg = str(exc)[:300]
    except BaseException:  # noqa: BLE001 -- a __str__ of the candidate's own
        msg = ""
    tb = traceback.extract_tb(exc.__traceback__)
    where = next(("solution.py:%s: %s" % (fr.lineno, fr.line) for fr in reversed(tb)
                  if fr.filename == "solution.py"), "")
    err = exc.errno if isinstance(exc, OSError) and type(exc.errno) is int else None
    return [type(exc).__name__, msg, err, where]


def drop_privileges(libc):
    """No capabilities (so no umount of the private /tmp), no new ones through exec."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    data = (ctypes.c_uint32 * 6)()
    return libc.capset(ctypes.byref(Header(0x20080522, 0)), data) == 0


def candidate_main(code, req_r, rep_w, libc, isolated):
    """Run the program, then answer the judge's requests until it closes the pipe."""
    if isolated and not drop_privileges(libc):
        os._exit(HARNESS_FAILED)
    signal.signal(signal.SIGXCPU, on_sigxcpu)  # PID 1 ignores signals it has no handler for
    me = os.getpid()
    objs = []

    def handle(x, depth):
        """Not plain data: a subclass of a builtin gives its plain value (its own ``__eq__``
        stays here), numpy gives ``tolist()``, anything else becomes a handle."""
        for base in (int, float, str):  # numpy.float64, IntEnum, str subclasses
            if isinstance(x, base) and type(x) is not bool:
                return getattr(base, "__%s__" % base.__name__)(x)
        for base in (list, tuple, dict, set, frozenset):  # namedtuple, OrderedDict, Counter
            if isinstance(x, base):
                return encode(base(x), handle, depth)
        if type(x).__module__.split(".")[0] == "numpy" and hasattr(x, "tolist"):
            return encode(x.tolist(), handle, depth + 1)
        objs.append(x)
        if isinstance(x, type(sys)):
            return {"m": [getattr(x, "__name__", ""), len(objs) - 1]}
        return {"h": len(objs) - 1}

    def enc(x):
        try:
            return encode(x, handle)
        except (ValueError, RecursionError):
            objs.append(x)
            return {"h": len(objs) - 1}

    def ref(tag, body):
        return objs[body]

    def serve(req):
        op, hid, args = req[0], req[1], decode(req[2], ref)
        obj = objs[hid]
        if op == "call":
            pos, kw = args
            result = obj(*pos, **kw)
            after = [[i, enc(v)] for i, v in enumerate(pos) if type(v) in (list, dict, set)]
            return {"ok": enc(result), "after": after}
        if op == "getattr":
            return {"ok": enc(getattr(obj, args))}
        if op == "getitem":
            return {"ok": enc(obj[args])}
        if op == "len":
            return {"ok": len(obj)}
        if op == "list":
            return {"ok": enc(list(obj))}
        if op == "str":
            return {"ok": str(obj)}
        raise ValueError("unknown request %r" % (op,))

    def flush():
        for stream in (sys.stdout, sys.stderr):  # os._exit skips the usual flush
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 -- e.g. EFBIG: the output cap was hit
                pass

    scope = {"__name__": "__main__", "__builtins__": builtins}
    linecache.cache["solution.py"] = (len(code), None, code.splitlines(True), "solution.py")
    try:
        exec(compile(code, "solution.py", "exec"), scope)
        hello = {"names": dict((k, enc(v)) for k, v in list(scope.items()) if not k.startswith("__"))}
    except BaseException as exc:  # noqa: BLE001 -- every failure of the candidate is a verdict
        hello = {"raise": describe(exc)}
    if os.getpid() != me:  # a forked copy of the candidate got here: only the original answers
        os._exit(1)
    flush()
    send(rep_w, hello)
    while "raise" not in hello:
        req = recv(req_r)
        if req is None:
            break
        try:
            reply = serve(req)
        except BaseException as exc:  # noqa: BLE001
            reply = {"raise": describe(exc)}
        if os.getpid() != me:
            os._exit(1)
        flush()
        send(rep_w, reply)
    os._exit(0)


# ----------------------------------------------------------------------------- judge side

def rebuild(desc):
    """The judge's own exception for one the candidate described: a builtin type where the
    name is one (so ``except ValueError`` in a test works), else a ``CandidateError``."""
    name, msg, err = str(desc[0])[:80], str(desc[1])[:300], desc[2]
    if name == "SystemExit":
        return CandidateExit("sys.exit(%s)" % msg)
    if name == "CPUTimeExceeded":
        return CPUTimeExceeded(msg)
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and cls not in (StopIteration, StopAsyncIteration):
        try:
            return cls(err, msg) if issubclass(cls, OSError) and type(err) is int else cls(msg)
        except Exception:  # noqa: BLE001 -- e.g. UnicodeDecodeError wants five arguments
            pass
    return type(name or "Error", (CandidateError,), {})(msg)


class Client:
    """The judge's end of the pipes to the candidate process."""

    def __init__(self, req_w, rep_r):
        self.req_w, self.rep_r = req_w, rep_r

    def ref(self, tag, body):
        if tag == "m":  # a module the program imported: the judge's own copy, when stdlib
            name, hid = str(body[0]), int(body[1])
            if name.split(".")[0] in getattr(sys, "stdlib_module_names", ()) and name not in ("antigravity", "this"):
                try:
                    return __import__(name, fromlist=["_"])
                except Exception:  # noqa: BLE001
                    pass
            return Proxy(self, hid, name)
        if type(body) is not int:
            raise CandidateGone("bad handle")
        return Proxy(self, body, "object")

    def encode_arg(self, x, depth):
        if type(x) is Proxy:
            return {"h": x._hid}
        raise UnsupportedTest("a %s cannot be passed to the candidate (values cross as data)" % type(x).__name__)

    def ask(self, req):
        try:
            send(self.req_w, req)
        except OSError:
            raise CandidateGone("the candidate's process has ended") from None
        reply = recv(self.rep_r)
        if type(reply) is not dict:
            raise CandidateGone("the candidate's process has ended" if reply is None else "bad reply")
        if "raise" in reply:
            raise rebuild(reply["raise"])
        return reply

    def op(self, op, hid, arg=None):
        return decode(self.ask([op, hid, encode(arg, self.encode_arg)])["ok"], self.ref)

    def call(self, hid, args, kwargs):
        reply = self.ask(["call", hid, encode([list(args), kwargs], self.encode_arg)])
        for i, v in reply.get("after", ()):  # in-place changes to a list/dict/set argument
            arg, new = args[i], decode(v, self.ref)
            if type(arg) is type(new) and arg != new:
                if type(arg) is list:
                    arg[:] = new
                else:
                    arg.clear()
                    arg.update(new)
        return decode(reply["ok"], self.ref)


class Proxy:
    """A candidate object the tests hold: calls, attributes, indexing, ``len`` and
    iteration are forwarded; equality is identity (the candidate's ``__eq__`` never runs)."""

    __slots__ = ("_c", "_hid", "_name")

    def __init__(self, client, hid, name):
        self._c, self._hid, self._name = client, hid, name

    def __call__(self, *args, **kwargs):
        return self._c.call(self._hid, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._c.op("getattr", self._hid, name)

    def __getitem__(self, key):
        return self._c.op("getitem", self._hid, key)

    def __len__(self):
        return self._c.op("len", self._hid)

    def __iter__(self):
        return iter(self._c.op("list", self._hid))

    def __contains__(self, value):
        return value in self._c.op("list", self._hid)

    def __str__(self):
        return self._c.op("str", self._hid)

    def __repr__(self):
        return "<candidate %s>" % self._name


class CountAsserts(ast.NodeTransformer):
    def visit_Assert(self, node):
        tick = ast.Expr(ast.Call(ast.Name("__datagen_tick__", ast.Load()), [], []))
        return [ast.copy_location(tick, node), node]


def run_tests(job, client, hello):
    """Raises (a verdict's exception) unless the tests ran at least one assert and all held."""
    if "raise" in hello:
        raise rebuild(hello["raise"])
    tests, entry = job["tests"], job.get("entry_point")
    scope = {"__name__": "__main__", "__builtins__": builtins}
    names = hello.get("names")
    if type(names) is not dict:
        raise CandidateGone("bad answer")
    for name, value in names.items():
        # Not dunders, not builtins the tests may use (a candidate's own abs() would decide
        # ``abs(f(x) - y) < eps``), unless it is the function under test.
        if type(name) is str and not name.startswith("__") and (not hasattr(builtins, name) or name == entry):
            scope[name] = decode(value, client.ref)
    if entry and entry not in scope:
        raise MissingEntryPoint("the program defines no %r" % entry)
    ticks = [0]

    def tick():
        ticks[0] += 1

    scope["__datagen_tick__"] = tick
    linecache.cache["tests.py"] = (len(tests), None, tests.splitlines(True), "tests.py")
    tree = ast.fix_missing_locations(CountAsserts().visit(ast.parse(tests, "tests.py")))
    exec(compile(tree, "tests.py", "exec", dont_inherit=True, optimize=0), scope)
    check = scope.get("check")
    if entry and callable(check) and type(check) is not Proxy:
        check(scope[entry])
    if not ticks[0]:
        raise NoTestsRan("the tests ran no assert (a check() nobody calls? give the seed an entry point)")


def candidate_status(pid, cpu_s):
    """Why the candidate process ended, once the judge lost it."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "code.no_result", "lost"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s and used.ru_utime + used.ru_stime >= cpu_s):
            return "code.timeout", "CPU time limit"
        if sig == signal.SIGXFSZ:
            return "code.output_limit", "killed by SIGXFSZ"
        return "code.killed", "killed by signal %d" % sig
    return "code.no_result", "the program's process exited (status %d) before the tests ended" % os.WEXITSTATUS(status)


def judge(job, client, pid, cpu_s):
    outcome = {"passed": False, "reason": "code.exception", "details": ""}
    hello = {}
    try:
        hello = recv(client.rep_r)
        if type(hello) is not dict:
            raise CandidateGone("no answer" if hello is None else "bad answer")
        run_tests(job, client, hello)
        outcome.update(passed=True, reason="ok")
    except CandidateGone as exc:
        reason, why = candidate_status(pid, cpu_s)
        outcome.update(reason=reason, details="%s (%s)" % (why, exc))
    except BaseException as exc:  # noqa: BLE001 -- every failure of the tests is a verdict
        tb = traceback.extract_tb(exc.__traceback__)
        where = next(("%s:%s: %s" % (fr.filename, fr.lineno, fr.line) for fr in reversed(tb)
                      if fr.filename == "tests.py"), "")
        if not where and isinstance(hello.get("raise"), list) and len(hello["raise"]) == 4:
            where = str(hello["raise"][3])
        outcome.update(reason=reason_for(exc),
                       details=("%s: %s" % (type(exc).__name__, exc))[:300] + (" at " + where if where else ""))
    return outcome


# ----------------------------------------------------------------------------- setup

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


def private_tmp(libc, lim):
    """One tmpfs (total bytes and files capped) on /tmp, bound on the other shared temp
    dirs, and the working directory inside it; it vanishes with the mount namespace."""
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    opts = "size=%d,nr_inodes=%d,mode=1777" % (lim["tmp_bytes"], lim["tmp_files"])
    if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()) != 0:
        return False
    for path in SHARED_TMP:
        if os.path.isdir(path):
            src = "/tmp/.%s" % path.strip("/").replace("/", "-")
            os.mkdir(src)
            os.chmod(src, 0o1777)
            if libc.mount(src.encode(), path.encode(), None, MS_BIND, None) != 0:
                return False
    os.mkdir("/tmp/work", 0o700)
    os.chdir("/tmp/work")
    for var in ("HOME", "TMPDIR", "TMP", "TEMP"):
        os.environ[var] = "/tmp/work"
    return True


def isolate(libc, lim):
    """New user + net + PID + mount namespaces; returns what was achieved (for the verdict)."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS) != 0:
        return {"netns": False, "pidns": False, "private_tmp": False, "error": os.strerror(ctypes.get_errno())}
    try:  # keep our own ids inside the namespace (else they read as 65534)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write("%d %d 1" % (uid, uid))
        with open("/proc/self/gid_map", "w") as f:
            f.write("%d %d 1" % (gid, gid))
    except OSError:
        pass
    return {"netns": True, "pidns": True, "private_tmp": private_tmp(libc, lim)}


def main():
    job_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2])
    first = recv(job_fd)  # the program and the limits; the tests come after the fork
    libc = ctypes.CDLL(None, use_errno=True)
    set_limits(first["limits"])
    iso = isolate(libc, first["limits"]) if first["isolate"] else {"netns": False, "pidns": False,
                                                                     "private_tmp": False}
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no /proc/<judge>/mem or /fd for its own uid
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the judge, whoever kills it
        keep = sorted((0, 1, 2, req_r, rep_w))
        for lo, hi in zip(keep, keep[1:] + [resource.getrlimit(resource.RLIMIT_NOFILE)[0]]):
            os.closerange(lo + 1, hi)
        try:
            candidate_main(first["code"], req_r, rep_w, libc, first["isolate"] and iso["pidns"])
        finally:
            os._exit(1)  # the judge reports why it lost the candidate; never the judge's failure code
    os.close(req_r)
    os.close(rep_w)
    cpu_s = first["limits"]["cpu_s"]
    del first
    job = recv(job_fd)
    os.close(job_fd)
    outcome = judge(job, Client(req_w, rep_r), pid, cpu_s)
    outcome.update(token=job["token"], isolation=iso)
    try:  # and reap it: a zombie would still count as a process of the run's uid
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass
    os.write(verdict_fd, json.dumps(outcome).encode())
    os._exit(0)


try:
    main()
except BaseException:  # noqa: BLE001 -- the judge itself broke: say so, exit with no verdict
    traceback.print_exc()
    os._exit(HARNESS_FAILED)
