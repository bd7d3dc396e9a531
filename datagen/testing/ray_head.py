"""A real Ray cluster on 127.0.0.1 (``ray start``), for tests of ``datagen submit`` and
of node loss: a head (GCS, raylet, dashboard and job server) and, if asked, worker
nodes joined to it, each in a private temp dir, on free ports, with token
authentication on.

Why not ``ray stop`` in teardown: it kills every Ray process of this user on the
machine, including other people's clusters and local ``ray.init`` instances. Every node
here is one ``ray start --block`` run as the leader of its own session, and Ray starts
the node's processes (raylet with its object store, workers, agents) inside that
session. So teardown ends exactly what it started: SIGTERM to that process (it stops its
children), then SIGKILL to anything left in the session or still running from the
node's temp dir. ``LocalRayNode.kill()`` SIGKILLs the whole session at once, which is
what a lost machine looks like to the rest of the cluster.

Settings a loopback cluster on Ray 2.60 needs (found the hard way; see
cluster/README.md): ``--node-ip-address 127.0.0.1`` and ``--dashboard-host 127.0.0.1``
so nothing binds a public interface; explicit free ports for the GCS, dashboard, its
agent, the client server, the runtime-env agent and metrics, so it never collides with
another Ray on the machine; ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN`` in the head's
environment and in every client's (since 2.59 a local cluster enables token auth when
``~/.ray/auth_token`` exists, and the job client then needs the same token); a short
``--temp-dir`` (Unix socket paths must stay under 108 bytes). A worker node joins with
``--address 127.0.0.1:GCS_PORT``, the same token and its own ports and temp dir.
"""

from __future__ import annotations

import json
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


def _signal(procs: list[Any], how: str) -> None:
    """``terminate`` or ``kill`` each psutil process, skipping those already gone."""
    import psutil

    for p in procs:
        try:
            getattr(p, how)()
        except psutil.Error:
            pass


class LocalRayNode:
    """One ``ray start --block``, leader of its own session, with the per-node ports."""

    def __init__(self, *, num_cpus: float, env: dict[str, str], start_timeout_s: float,
                 object_store_mb: int | None = None):
        self.num_cpus = num_cpus
        self.start_timeout_s = start_timeout_s
        self.object_store_mb = object_store_mb
        self.env = env
        (self.agent_listen_port, self.agent_grpc_port, self.runtime_env_port, self.metrics_port,
         self.node_manager_port, self.object_manager_port) = _free_ports(6)
        self.temp_dir = ""
        self._proc: subprocess.Popen | None = None
        self._log: Any = None

    def _node_args(self) -> list[str]:
        args = ["--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                "--dashboard-agent-listen-port", str(self.agent_listen_port),
                "--dashboard-agent-grpc-port", str(self.agent_grpc_port),
                "--runtime-env-agent-port", str(self.runtime_env_port),
                "--metrics-export-port", str(self.metrics_port),
                "--node-manager-port", str(self.node_manager_port),
                "--object-manager-port", str(self.object_manager_port),
                "--num-cpus", f"{self.num_cpus:g}", "--num-gpus", "0"]
        if self.object_store_mb:
            args += ["--object-store-memory", str(self.object_store_mb * 2**20)]
        return args

    def _launch(self, role_args: list[str]) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: socket paths
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_bin, "start", *role_args, *self._node_args(), "--temp-dir", self.temp_dir]
        self._log = open(Path(self.temp_dir) / "ray-start.log", "wb")
        self._proc = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def _check_running(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {self._proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join((Path(self.temp_dir) / "ray-start.log").read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def processes(self) -> list[Any]:
        """Our processes still alive: the session's, and any whose command line names our temp dir."""
        return self._own_processes()

    def _own_processes(self) -> list[Any]:
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

    def actor_pids(self, class_name: str) -> list[int]:
        """This node's actor processes of one class (Ray titles them ``ray::Class...``)."""
        import psutil

        pids = []
        for p in self._own_processes():
            try:
                if " ".join(p.cmdline()).startswith(f"ray::{class_name}"):
                    pids.append(p.pid)
            except psutil.Error:
                continue
        return pids

    def kill(self) -> None:
        """SIGKILL the whole node at once (raylet and object store, workers, agents,
        ``ray start`` itself): to the rest of the cluster, a machine that vanished."""
        import psutil

        procs = self._own_processes()
        _signal(procs, "kill")
        psutil.wait_procs(procs, timeout=10)
        if self._proc is not None:
            self._proc.wait()

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
            _signal(leftovers, "terminate")
            _, alive = psutil.wait_procs(leftovers, timeout=10)
            _signal(alive, "kill")
            psutil.wait_procs(alive, timeout=10)
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        if self._log is not None:
            self._log.close()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class LocalRayHead(LocalRayNode):
    """The head; ``add_worker()`` joins worker nodes to it, torn down with it."""

    def __init__(self, *, num_cpus: float = 2, env: dict[str, str] | None = None, start_timeout_s: float = 120,
                 object_store_mb: int | None = None):
        self.token = secrets.token_hex(16)
        # What a client (datagen submit, the job driver) needs to talk to this cluster.
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        full_env = {**os.environ, **(env or {}), **self.client_env, "RAY_USAGE_STATS_ENABLED": "0"}
        full_env.pop("RAY_ADDRESS", None)
        super().__init__(num_cpus=num_cpus, env=full_env, start_timeout_s=start_timeout_s,
                         object_store_mb=object_store_mb)
        self.gcs_port, self.dashboard_port, self.client_port = _free_ports(3)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"  # for a driver: RAY_ADDRESS / runtime.ray_address
        self.workers: list[LocalRayNode] = []

    def __enter__(self) -> LocalRayHead:
        self._launch(["--head", "--port", str(self.gcs_port),
                      "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                      "--dashboard-port", str(self.dashboard_port),
                      "--ray-client-server-port", str(self.client_port)])
        try:
            self._wait(lambda: self._get("/api/version") is not None, "Ray head not ready")
        except BaseException:
            self.__exit__()
            raise
        return self

    def add_worker(self, *, num_cpus: float = 1, object_store_mb: int | None = None) -> LocalRayNode:
        """Start a worker node joined to this head; returns once the cluster counts it alive."""
        node = LocalRayNode(num_cpus=num_cpus, env=self.env, start_timeout_s=self.start_timeout_s,
                            object_store_mb=object_store_mb)
        self.workers.append(node)
        want = len([w for w in self.workers if w._proc is None or w._proc.poll() is None])
        node._launch(["--address", self.gcs_address])
        self._wait(lambda: node._check_running() or self.alive_nodes() >= want + 1,
                   "Ray worker node not registered", node)
        return node

    def alive_nodes(self) -> int:
        data = self._get("/api/v0/nodes?limit=1000")
        if data is None:
            return 0
        return sum(1 for n in data["data"]["result"]["result"] if n.get("state") == "ALIVE")

    def _get(self, path: str) -> Any | None:
        req = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read()) if resp.status == 200 else None
        except (OSError, ValueError):
            return None

    def _wait(self, ready: Any, what: str, node: LocalRayNode | None = None) -> None:
        node = node or self
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            node._check_running()
            if ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} after {self.start_timeout_s:g} s:\n{node.log_tail()}")
            time.sleep(0.5)

    def processes(self) -> list[Any]:
        """Every node's: the head's and its workers'."""
        return self._own_processes() + [p for w in self.workers for p in w.processes()]

    def __exit__(self, *exc: Any) -> None:
        for node in reversed(self.workers):
            node.__exit__()
        super().__exit__()
