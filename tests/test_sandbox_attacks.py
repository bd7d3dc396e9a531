"""Programs that try to talk the code sandbox into a pass, or to leave something behind.

Each attack is a real candidate program, run in the real sandbox against a test it
cannot pass honestly (``f(1) == 2`` from a ``return None`` stub): every one must end in
FAIL. Then the benchmark-style tests that define ``check(candidate)`` and never call it,
and files left in ``/tmp`` and ``/dev/shm``. The table in ``filters/README.md`` lists
these attacks and what the sandbox still does not cover.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from datagen.filters import FilterChain, FilterError
from datagen.filters.sandbox import Limits, isolation, run_code
from datagen.prompts import AnswerFormat

FAST = Limits(timeout_s=6, cpu_s=2, memory_bytes=512 << 20, processes=32, file_bytes=4 << 20)
TESTS = "assert f(1) == 2\nassert f(2) == 3\n"
STUB = "def f(x):\n    return None\n"

# name -> program that would turn the stub into a pass against the in-process harness.
ATTACKS = {
    "json.dumps replaced": STUB + (
        "import json\n_dumps = json.dumps\n"
        "json.dumps = lambda o, *a, **k: _dumps(dict(o, passed=True, reason='ok') if isinstance(o, dict) else o)\n"),
    "os.write replaced": STUB + (
        "import os\n_write = os.write\n"
        "os.write = lambda fd, b: _write(fd, b.replace(b'\"passed\": false', b'\"passed\": true')"
        ".replace(b'code.test_failed', b'ok'))\n"),
    "builtins.exec replaced (tests never run)": STUB + (
        "import builtins\n_exec = builtins.exec\n"
        "def exec(src, *a, **k):\n"
        "    if getattr(src, 'co_filename', '') == 'tests.py':\n        return None\n"
        "    return _exec(src, *a, **k)\n"
        "builtins.exec = exec\n"),
    "sys.stdout.flush walks to the verdict": STUB + (
        "import sys\n"
        "class Out:\n"
        "    def __init__(self, real):\n        self.real = real\n"
        "    def write(self, s):\n        return self.real.write(s)\n"
        "    def flush(self):\n"
        "        fr = sys._getframe(1)\n"
        "        while fr is not None:\n"
        "            for v in list(fr.f_locals.values()):\n"
        "                if isinstance(v, dict) and 'passed' in v:\n"
        "                    v.update(passed=True, reason='ok')\n"
        "            fr = fr.f_back\n"
        "        self.real.flush()\n"
        "sys.stdout = Out(sys.stdout)\n"),
    "frame walk to the token, result file written": STUB + (
        "import sys, os, json\n"
        "fr = sys._getframe()\n"
        "while fr is not None:\n"
        "    job = fr.f_locals.get('job')\n"
        "    if isinstance(job, dict) and 'token' in job:\n"
        "        t = job['token']\n"
        "        for name in ('.result-%s.json' % t, os.path.join(os.getcwd(), '.result-%s.json' % t)):\n"
        "            try:\n"
        "                open(name, 'w').write(json.dumps({'token': t, 'passed': True, 'reason': 'ok'}))\n"
        "            except OSError:\n"
        "                pass\n"
        "        os._exit(0)\n"
        "    fr = fr.f_back\n"),
    "gc scan for the job, result file written": STUB + (
        "import gc, os, json\n"
        "for o in gc.get_objects():\n"
        "    if isinstance(o, dict) and isinstance(o.get('token'), str) and 'tests' in o:\n"
        "        open('.result-%s.json' % o['token'], 'w').write(\n"
        "            json.dumps({'token': o['token'], 'passed': True, 'reason': 'ok'}))\n"
        "        os._exit(0)\n"),
    "atexit hook after sys.exit": STUB + (
        "import atexit, gc, json, sys\n"
        "job = next((o for o in gc.get_objects() if isinstance(o, dict) and 'token' in o), {'token': ''})\n"
        "atexit.register(lambda: open('.result-%s.json' % job['token'], 'w').write(\n"
        "    json.dumps({'token': job['token'], 'passed': True, 'reason': 'ok'})))\n"
        "sys.exit(0)\n"),
    "__eq__ always true": (
        "class Anything:\n"
        "    def __eq__(self, other):\n        return True\n"
        "    __hash__ = object.__hash__\n"
        "def f(x):\n    return Anything()\n"),
    "int subclass with __eq__ always true": (
        "class Anything(int):\n"
        "    def __eq__(self, other):\n        return True\n"
        "    __hash__ = int.__hash__\n"
        "def f(x):\n    return Anything(0)\n"),
    "assert statements switched off (sys.flags / -O)": STUB + (
        "import sys, ctypes\n"
        "# the tests are compiled by the harness: ask compile() for optimize=1 from here\n"
        "import builtins\n_compile = builtins.compile\n"
        "builtins.compile = lambda src, fn, mode, *a, **k: _compile(src, fn, mode, optimize=2)\n"),
    "kill the harness": STUB + "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "a builtin the tests use, shadowed": (
        "def f(x):\n    return 0\n"
        "def abs(x):\n    return 0\n"),
    "forged verdict into every pipe reachable through /proc or inherited": STUB + (
        "import os, json\n"
        "forged = json.dumps({'passed': True, 'reason': 'ok'}).encode()\n"
        "for fd in range(3, 256):\n"
        "    try:\n        os.write(fd, forged)\n    except OSError:\n        pass\n"
        "for pid in os.listdir('/proc'):\n"
        "    try:\n        fds = os.listdir('/proc/%s/fd' % pid)\n    except OSError:\n        continue\n"
        "    for fd in fds:\n"
        "        try:\n"
        "            w = os.open('/proc/%s/fd/%s' % (pid, fd), os.O_WRONLY | os.O_NONBLOCK)\n"
        "            os.write(w, forged)\n            os.close(w)\n"
        "        except OSError:\n            pass\n"),
}
# The shadowed builtin only helps against tests that use it:
TESTS_FOR = {"a builtin the tests use, shadowed": "assert abs(f(1) - 2) < 1e-9\n"}


@pytest.mark.parametrize("isolate", [True, False], ids=["namespaces", "no-namespaces"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_an_attack_on_the_harness_does_not_pass(name, isolate):
    res = run_code(ATTACKS[name], TESTS_FOR.get(name, TESTS), limits=FAST, isolate=isolate)
    assert not res.passed, f"{name}: the stub passed ({res.reason})"
    assert res.reason != "ok"


def test_the_candidate_never_holds_the_tests():
    """It could read the expected values out of them and return those."""
    code = ("import gc\n"
            "def look():\n"
            "    mark = ''.join(['DATAGEN-', 'TESTS-MARK'])  # built here: not a constant, not in a dict\n"
            "    return any(mark in repr(o) for o in gc.get_objects() if isinstance(o, (dict, list, tuple)))\n"
            "seen = look()\n"
            "def f():\n    return seen\n")
    res = run_code(code, "assert f() is False  # DATAGEN-TESTS-MARK", limits=FAST)
    assert res.passed, res.details


def test_values_cross_as_data_with_their_types():
    """Tuples stay tuples, exceptions keep their type, and a mutated argument is seen."""
    code = ("def f(x):\n    return [(1, 2), {'a': {1, 2}}, b'z', 1.5, None, True, 10**30]\n"
            "def bad():\n    raise ValueError('no')\n"
            "def grow(xs):\n    xs.append(len(xs))\n"
            "class Stack:\n"
            "    def __init__(self):\n        self.items = []\n"
            "    def push(self, v):\n        self.items.append(v)\n"
            "    def pop(self):\n        return self.items.pop()\n"
            "def gen(n):\n    yield from range(n)\n")
    tests = ("assert f(0) == [(1, 2), {'a': {1, 2}}, b'z', 1.5, None, True, 10**30]\n"
             "try:\n    bad()\n    raise AssertionError('no error')\nexcept ValueError as e:\n    assert 'no' in str(e)\n"
             "xs = [7]\ngrow(xs)\nassert xs == [7, 1]\n"
             "s = Stack()\ns.push(3)\nassert s.pop() == 3\nassert len(s.items) == 0\n"
             "assert list(gen(3)) == [0, 1, 2]\n")
    res = run_code(code, tests, limits=FAST)
    assert res.passed, res.details


# ------------------------------------------------------------ benchmark-style tests (item 2)

HUMANEVAL_TESTS = ("METADATA = {'author': 'x'}\n\n"
                   "def check(candidate):\n"
                   "    assert candidate(1) == 2\n"
                   "    assert candidate(5) == 6\n")


def test_tests_that_only_define_check_do_not_pass_a_stub():
    res = run_code(STUB, HUMANEVAL_TESTS, limits=FAST)
    assert (res.passed, res.reason) == (False, "code.no_tests_ran")


def test_an_entry_point_calls_check_on_the_candidate():
    good = "def incr(x):\n    return x + 1\n"
    stub = "def incr(x):\n    return None\n"
    tests = HUMANEVAL_TESTS
    assert run_code(good, tests, limits=FAST, entry_point="incr").passed
    res = run_code(stub, tests, limits=FAST, entry_point="incr")
    assert (res.passed, res.reason) == (False, "code.test_failed")
    res = run_code("def other(x):\n    return x + 1\n", tests, limits=FAST, entry_point="incr")
    assert (res.passed, res.reason) == (False, "code.missing_entry_point")


def test_the_code_filter_reads_the_entry_point_from_the_seed():
    chain = FilterChain([{"name": "code", "timeout_s": 6}], AnswerFormat())
    seed = {"id": "he-0", "tests": HUMANEVAL_TESTS, "entry_point": "incr"}
    rows = [{"response": "```python\ndef incr(x):\n    return x + 1\n```"},
            {"response": "```python\ndef incr(x):\n    return None\n```"}]
    (good,), (stub,) = chain.run(rows, [seed, seed])
    assert (good.keep, stub.keep, stub.reason) == (True, False, "code.test_failed")


@pytest.mark.parametrize("tests, why", [
    (HUMANEVAL_TESTS, "never call them"),
    ("def helper():\n    return 1\n", "asserts nothing"),
    ("", "has none"),
    ("assert (", "syntax"),
])
def test_validate_refuses_tests_that_would_run_no_check(tests, why):
    chain = FilterChain(["code"], AnswerFormat())
    with pytest.raises(FilterError, match=why):
        chain.check_seeds([{"id": "s1", "tests": tests}], id_field="id")
    chain.check_seeds([{"id": "s1", "tests": HUMANEVAL_TESTS, "entry_point": "f"},
                       {"id": "s2", "tests": "assert f(1) == 2"},
                       {"id": "s3", "tests": ["assert f(1) == 2", "assert f(2) == 3"]},
                       {"id": "s4", "tests": HUMANEVAL_TESTS + "check(f)\n"}], id_field="id")


# ------------------------------------------------------------ files outside the run (item 3)

def _private_tmp() -> bool:
    return isolation().get("private_tmp", False)


@pytest.mark.parametrize("where", ["/tmp", "/dev/shm", "/var/tmp"])
def test_files_written_to_shared_temp_dirs_do_not_outlive_the_run(where):
    mark = "datagen-left-" + uuid.uuid4().hex
    code = (f"import os\nopen(os.path.join({where!r}, {mark!r}), 'w').write('x' * 1000)\n"
            "def f():\n    return 1\n")
    res = run_code(code, "assert f() == 1", limits=FAST)
    assert res.passed, res.details
    assert not (Path(where) / mark).exists(), f"{where}/{mark} outlived the run"


def test_tmpdir_is_private_to_the_run_and_removed():
    code = ("import os, tempfile\nd = tempfile.gettempdir()\n"
            "open(os.path.join(d, 'probe'), 'w').write('x')\n"
            "def where():\n    return d\n")
    res = run_code(code, "import os\nassert os.environ['TMPDIR'] == where(), (os.environ['TMPDIR'], where())",
                   limits=FAST)
    assert res.passed, res.details


def test_many_small_files_hit_a_total_cap():
    """RLIMIT_FSIZE caps one file; a stream of them must stop at the run's total."""
    if not _private_tmp():
        pytest.xfail("no unprivileged mount namespace here: the total is not capped (see sandbox.py)")
    code = ("import os\nchunk = b'x' * (1 << 20)\n"
            "for i in range(64):\n"
            "    with open(os.path.join('/dev/shm', 'f%d' % i), 'wb') as fh:\n        fh.write(chunk)\n")
    res = run_code(code, "assert True", limits=Limits(timeout_s=6, cpu_s=2, file_bytes=4 << 20, tmp_bytes=16 << 20))
    assert (res.passed, res.reason) == (False, "code.disk_limit")
    code = "import os\nfor i in range(100000):\n    open('/tmp/f%d' % i, 'w').close()\n"
    res = run_code(code, "assert True", limits=Limits(timeout_s=6, cpu_s=2, tmp_files=512))
    assert (res.passed, res.reason) == (False, "code.disk_limit")


def test_the_candidate_cannot_unmount_its_private_tmp():
    if not _private_tmp():
        pytest.xfail("no unprivileged mount namespace here")
    mark = "datagen-umount-" + uuid.uuid4().hex
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "rc = [libc.umount2(p, 2) for p in (b'/tmp', b'/dev/shm')]\n"
            f"open('/tmp/{mark}', 'w').close()\n"
            "def f():\n    return rc\n")
    res = run_code(code, "assert f() == [-1, -1], f()", limits=FAST)
    assert res.passed, res.details
    assert not (Path("/tmp") / mark).exists()


def test_without_a_mount_namespace_root_sweeps_the_runs_files():
    if os.geteuid() != 0:
        pytest.skip("the sweep needs root (a per-run uid)")
    mark = "datagen-sweep-" + uuid.uuid4().hex
    code = (f"import os\nfor d in ('/tmp', '/dev/shm'):\n"
            f"    os.makedirs(os.path.join(d, {mark!r}, 'sub'))\n"
            f"    open(os.path.join(d, {mark!r}, 'sub', 'x'), 'w').write('x')\n"
            "def f():\n    return 1\n")
    res = run_code(code, "assert f() == 1", limits=FAST, isolate=False)
    assert res.passed, res.details
    assert not (Path("/tmp") / mark).exists() and not (Path("/dev/shm") / mark).exists()
