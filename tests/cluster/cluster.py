"""A real multi-process Ray cluster on this machine, for the tests in this folder.

Every node is ``ray start --block`` in its own process group, with its own temp dir and its
own ports, so a test can kill one node (the whole group, as a machine that disappears) and
clean up exactly its own processes: never a global ``ray stop``, which would end every other
Ray on the machine. Nodes start without the project on ``PYTHONPATH`` and without S3
credentials, so the code and the credentials a job needs must travel with it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import free_port

BIN = Path(sys.executable).parent


def node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_", "PYTHONPATH", "VIDPRUNE"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        # A lost node is declared dead after ~2 s instead of ~15 s.
        "RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        "RAY_USAGE_STATS_ENABLED": "0",
        # A stopped driver gets 30 s to record its end (Ray's default: 3 s, then SIGKILL).
        "RAY_JOB_STOP_WAIT_TIME_S": "30",
        # Ray's own OOM killer watches the whole machine: on a shared test machine other
        # processes' memory would make it kill this cluster's workers. Off (the kernel's
        # stays).
        "RAY_memory_monitor_refresh_ms": "0",
        # Workers push custom metrics to their node's exporter every second, not every 10.
        "RAY_metrics_report_interval_ms": "1000",
        # Whatever ~/.ray holds on this machine: the test cluster and its clients agree.
        "RAY_AUTH_MODE": "disabled",
    })
    return env


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    metrics_port: int
    node_id: str | None = None

    def kill(self) -> None:
        """SIGKILL every process of the node: a machine that disappears."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._kill_rest()
        self.proc.wait(timeout=30)

    def _kill_rest(self) -> None:
        """Ray starts each worker in a process group of its own: find the node's remaining
        processes by its temp dir, which is on each of their command lines."""
        import psutil

        marker = str(self.temp_dir)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(marker in part for part in (p.info["cmdline"] or [])):
                    p.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass


@dataclass
class LocalCluster:
    root: Path
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    client_port: int = field(default_factory=free_port)   # Ray Client (ray://)
    nodes: list[Node] = field(default_factory=list)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> Node:
        temp_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        log = self.root / f"{name}.log"
        metrics_port = free_port()
        cmd = [str(BIN / "ray"), "start", *args, "--temp-dir", str(temp_dir),
               "--node-ip-address", "127.0.0.1", "--object-store-memory", str(96 << 20),
               "--node-manager-port", str(free_port()),
               "--object-manager-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()),
               "--dashboard-agent-grpc-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()),
               "--metrics-export-port", str(metrics_port),
               "--disable-usage-stats", "--block"]
        # Each node its own chunk cache (operators/cache.py), gone with its temp dir.
        env = {**node_env(), "VIDPRUNE_CACHE_DIR": str(temp_dir / "cache")}
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root)
        node = Node(name, proc, temp_dir, log, metrics_port)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int) -> Node:
        head = self._start("head", [
            "--head", "--port", str(self.gcs_port), "--num-cpus", str(num_cpus),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--ray-client-server-port", str(self.client_port)])
        self._wait_for_nodes(1, head)
        return head

    def add_worker(self, num_cpus: int) -> Node:
        worker = self._start(f"worker{len(self.nodes)}", [
            "--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", str(num_cpus)])
        self._wait_for_nodes(sum(n.proc.poll() is None for n in self.nodes), worker)
        return worker

    def alive_nodes(self) -> list[dict]:
        from ray.util.state import list_nodes

        return [n.__dict__ if hasattr(n, "__dict__") else n
                for n in list_nodes(address=self.dashboard_url, raise_on_missing_output=False)
                if (n.state if hasattr(n, "state") else n["state"]) == "ALIVE"]

    def _wait_for_nodes(self, count: int, node: Node, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise RuntimeError(f"{node.name} exited: {node.log.read_text()[-3000:]}")
            try:
                alive = self.alive_nodes()
            except Exception:
                alive = []
            if len(alive) >= count:
                known = {n.node_id for n in self.nodes}
                fresh = [n for n in alive if n["node_id"] not in known]
                if fresh:
                    node.node_id = fresh[0]["node_id"]
                return
            time.sleep(0.5)
        raise RuntimeError(f"{node.name} did not join in {timeout_s:.0f} s: "
                           f"{node.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """End every process of every node (SIGTERM, then SIGKILL), remove temp dirs."""
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                try:
                    os.killpg(node.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 3  # then SIGKILL: the temp dirs go anyway
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever is left of the group, then of the node
                os.killpg(node.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node._kill_rest()
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
