"""A real single-node Ray cluster on 127.0.0.1 (``ray start --head``), for tests of
``datagen submit``: GCS, raylet, dashboard and job server, in a private temp dir, on
free ports, with token authentication on.

Why not ``ray stop`` in teardown: it kills every Ray process of this user on the
machine, including other people's clusters and local ``ray.init`` instances. This
helper runs ``ray start --head --block`` as the leader of its own session, so teardown
ends exactly what it started: SIGTERM to that process (it stops its children), then
SIGKILL to anything left in the session or still running from the private temp dir.

Settings a loopback cluster on Ray 2.60 needs (found the hard way; see
cluster/README.md): ``--node-ip-address 127.0.0.1`` and ``--dashboard-host 127.0.0.1``
so nothing binds a public interface; explicit free ports for the GCS, dashboard, its
agent, the client server, the runtime-env agent and metrics, so it never collides with
another Ray on the machine; ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN`` in the head's
environment and in every client's (since 2.59 a local cluster enables token auth when
``~/.ray/auth_token`` exists, and the job client then needs the same token); a short
``--temp-dir`` (Unix socket paths must stay under 108 bytes).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalRayHead:
    def __init__(self, *, num_cpus: int = 2, env: dict[str, str] | None = None, start_timeout_s: float = 120):
        self.num_cpus = num_cpus
        self.start_timeout_s = start_timeout_s
        self.token = secrets.token_hex(16)
        (self.gcs_port, self.dashboard_port, self.client_port, self.agent_listen_port, self.agent_grpc_port,
         self.runtime_env_port, self.metrics_port, self.node_manager_port, self.object_manager_port) = _free_ports(9)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # What a client (datagen submit, the job driver) needs to talk to this cluster.
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.env = {**os.environ, **(env or {}), **self.client_env, "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.temp_dir = ""
        self._proc: subprocess.Popen | None = None
        self._log: Any = None

    def __enter__(self) -> LocalRayHead:
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: socket paths
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_bin, "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--port", str(self.gcs_port),
               "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(self.dashboard_port),
               "--dashboard-agent-listen-port", str(self.agent_listen_port),
               "--dashboard-agent-grpc-port", str(self.agent_grpc_port),
               "--ray-client-server-port", str(self.client_port),
               "--runtime-env-agent-port", str(self.runtime_env_port),
               "--metrics-export-port", str(self.metrics_port),
               "--node-manager-port", str(self.node_manager_port),
               "--object-manager-port", str(self.object_manager_port),
               "--num-cpus", str(self.num_cpus), "--num-gpus", "0", "--temp-dir", self.temp_dir]
        self._log = open(Path(self.temp_dir) / "ray-start.log", "wb")
        self._proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        req = urllib.request.Request(f"{self.address}/api/version",
                                     headers={"Authorization": f"Bearer {self.token}"})
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(req, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray head not ready after {self.start_timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((Path(self.temp_dir) / "ray-start.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def processes(self) -> list[Any]:
        """Our processes still alive: the session's, and any whose command line names our temp dir."""
        import psutil

        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid == os.getpid():
                    continue
                in_session = self._proc is not None and os.getsid(p.pid) == self._proc.pid
                names_dir = bool(self.temp_dir) and any(self.temp_dir in a for a in (p.info["cmdline"] or []))
                if (in_session or names_dir) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return found

    def __exit__(self, *exc: Any) -> None:
        import psutil

        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)  # --block: ray start stops what it started
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            leftovers = self.processes()
            for p in leftovers:
                try:
                    p.terminate()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(leftovers, timeout=10)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=10)
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        if self._log is not None:
            self._log.close()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
