"""The code sandbox against hostile programs: each ends in FAIL with its own reason, and
the host is unharmed (nothing written outside, no process left behind, no secret read,
no connection made). Real subprocesses, real namespaces, real rlimits."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from datagen.filters.sandbox import Limits, SandboxError, isolation, run_code

FAST = Limits(timeout_s=6, cpu_s=2, memory_bytes=512 << 20, processes=32, file_bytes=4 << 20)
HARNESS_MARK = "CPUTimeExceeded"  # a string only the sandbox harness's command line holds


def leftover(mark: str) -> list[int]:
    """Pids whose command line contains ``mark`` (the sandbox's, or a marker the candidate used)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if mark in cmd:
                found.append(int(name))
    return found


def run(code: str, tests: str = "", limits: Limits = FAST):
    res = run_code(code, tests, limits=limits)
    assert not leftover(HARNESS_MARK), "a sandbox process outlived its run"
    return res


def test_a_correct_program_passes_and_a_wrong_one_fails():
    assert run("def f(x):\n    return x + 1\n", "assert f(1) == 2").passed
    res = run("def f(x):\n    return x\n", "assert f(1) == 2")
    assert not res.passed and res.reason == "code.test_failed"
    assert "assert f(1) == 2" in res.details  # the failing line, for the reject stream


def test_infinite_loop_hits_the_cpu_limit():
    res = run("while True:\n    pass\n")
    assert (res.passed, res.reason) == (False, "code.timeout")


def test_sleeping_forever_hits_the_wall_clock():
    res = run("import time\ntime.sleep(3600)\n", limits=Limits(timeout_s=1.5, cpu_s=2))
    assert (res.passed, res.reason) == (False, "code.timeout")
    assert "wall clock" in res.details


def test_fork_bomb_is_stopped_by_the_process_limit():
    res = run("import os\nwhile True:\n    os.fork()\n")
    assert (res.passed, res.reason) == (False, "code.process_limit")


def test_fork_bomb_that_ignores_errors_times_out_and_leaves_nothing():
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    res = run(code, limits=Limits(timeout_s=3, cpu_s=1, processes=16))
    assert not res.passed and res.reason in ("code.timeout", "code.killed")


def test_allocating_4_gb_hits_the_memory_limit():
    res = run("block = bytearray(4 * 2**30)\n")
    assert (res.passed, res.reason) == (False, "code.memory_limit")


def test_writing_outside_the_temp_dir_is_refused(tmp_path):
    # a host dir the run's uid cannot write, and never under /tmp (which the run may have its own of)
    target = Path("/etc") / f"owned-{uuid.uuid4().hex}.txt"
    res = run(f"open({str(target)!r}, 'w').write('pwned')\n")
    assert (res.passed, res.reason) == (False, "code.permission_denied")
    assert not target.exists()
    target = tmp_path / "owned.txt"  # under the host's /tmp: hidden by the run's own /tmp, or not writable
    res = run(f"open({str(target)!r}, 'w').write('pwned')\n")
    assert not res.passed and res.reason in ("code.permission_denied", "code.exception")
    assert not target.exists()


def test_the_hosts_api_keys_are_not_in_the_environment(monkeypatch):
    secret = "sk-sentinel-" + uuid.uuid4().hex
    monkeypatch.setenv("DATAGEN_TEST_API_KEY", secret)
    code = "import os\nleaked = os.environ.get('DATAGEN_TEST_API_KEY')\nprint(leaked, dict(os.environ))\n"
    digest = hashlib.sha256(secret.encode()).hexdigest()  # the test names a hash, not the secret
    res = run(code, f"import hashlib\nassert hashlib.sha256(str(leaked).encode()).hexdigest() == {digest!r}")
    assert (res.passed, res.reason) == (False, "code.test_failed")
    assert "None" in res.stdout_tail  # it printed what it found: nothing
    assert secret not in res.stdout_tail and secret not in res.details
    # What the program does see: only the scrubbed variables.
    ok = run("import os\nkeys = set(os.environ)\n",
             "assert keys <= {'PATH', 'HOME', 'TMPDIR', 'TMP', 'TEMP', 'LANG', 'PYTHONDONTWRITEBYTECODE', "
             "'LC_CTYPE'}, keys")
    assert ok.passed, ok.details


def test_no_network_connection_leaves_the_sandbox():
    if not isolation()["netns"]:
        pytest.xfail("this kernel/container gives no unprivileged network namespace (see sandbox.py)")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        srv.settimeout(0.5)
        port = srv.getsockname()[1]
        res = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n")
        assert (res.passed, res.reason) == (False, "code.network_denied")
        with pytest.raises(socket.timeout):
            srv.accept()  # nobody connected


def test_printing_a_fake_success_marker_and_exiting_0_fails():
    code = ("import json, os\nprint('PASS', flush=True)\n"
            "print(json.dumps({'passed': True, 'reason': 'ok'}), flush=True)\n"
            "open('.result.json', 'w').write('{\"passed\": true}')\nos._exit(0)\n")
    res = run(code, "assert False")
    assert (res.passed, res.reason) == (False, "code.no_result")
    assert "PASS" in res.stdout_tail  # it did print it; stdout is just not where verdicts come from


def test_sys_exit_0_is_not_a_pass():
    res = run("import sys\nsys.exit(0)\n", "assert True")
    assert (res.passed, res.reason) == (False, "code.exited")


def test_a_grandchild_that_outlives_its_parent_is_killed(tmp_path):
    mark = "datagen-grandchild-" + uuid.uuid4().hex
    witness = Path("/tmp") / mark  # world-writable (when the run has no private /tmp of its own)
    code = ("import os, subprocess\n"
            f"subprocess.Popen(['sh', '-c', 'sleep 2; touch {witness}; sleep 60 # {mark}'],\n"
            "                 start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "os._exit(0)\n")
    res = run(code)
    assert (res.passed, res.reason) == (False, "code.no_result")
    assert not leftover(mark), "the detached grandchild survived the run"
    time.sleep(3)  # past the moment it would have written its witness file
    assert not witness.exists()
    assert not leftover(mark)


def test_100_mb_of_output_is_capped():
    code = ("import sys\nchunk = 'x' * (1 << 20)\n"
            "for _ in range(100):\n    sys.stdout.write(chunk)\n    sys.stdout.flush()\n")
    res = run(code)
    assert (res.passed, res.reason) == (False, "code.output_limit")
    assert len(res.stdout_tail) <= 2000


def test_waiting_on_stdin_gets_eof_at_once():
    res = run("line = input()\n", limits=Limits(timeout_s=30, cpu_s=2))
    assert (res.passed, res.reason) == (False, "code.stdin_closed")  # not code.timeout: it did not wait


def test_a_sandbox_that_cannot_start_raises_instead_of_failing_the_row():
    with pytest.raises(SandboxError, match="could not start"):
        run_code("pass", "", python="/nonexistent/python3")
