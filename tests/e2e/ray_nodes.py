"""Two Ray nodes on this machine for the multi-node test: a head and a worker, each a `ray start --block` process
(Ray's own CLI) with its own temp dir, custom resources and PID; stopped by SIGTERM to that PID (never `ray stop`,
which would end every Ray cluster on the machine).

Both nodes use node address 127.0.0.1 so that every Ray listener stays on loopback. That needs
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (else Ray rewrites 127.0.0.1 to the machine's address and binds every
interface), and with it Ray's CLI refuses to start a *worker* node ("multi-node clusters are not supported"). So the
worker runs the same CLI through `python -c`, with that one guard lifted in scripts.py's view of the constants only.
On a real cluster none of this applies: plain `ray start` on each host (README, "A real cluster").
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from protocol.sockets import free_port

# The `ray` CLI with the worker-node guard lifted; everything else (node address resolution) still sees the env var.
_WORKER_CLI = (
    "import sys, types\n"
    "import ray._private.ray_constants as constants\n"
    "from ray.scripts import scripts\n"
    "view = types.ModuleType('ray_constants_view'); view.__dict__.update(vars(constants))\n"
    "view.ENABLE_RAY_CLUSTER = True\n"
    "scripts.ray_constants = view\n"
    "sys.argv = ['ray', *sys.argv[1:]]\n"
    "scripts.main()\n"
)


class LoopbackRayCluster:
    """`head_resources` / `worker_resources`: custom resources of each node, e.g. {"learner_node": 2}."""

    def __init__(self, base: Path, head_resources: dict[str, float], worker_resources: dict[str, float],
                 num_cpus: int = 4) -> None:
        self.base = base
        # Ray's unix sockets live under each node's temp dir (<= 107 bytes in all): a short folder, not pytest's.
        self.temp = Path(tempfile.mkdtemp(prefix="forage-ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token = secrets.token_hex(32)
        home = base / "home"  # whatever Ray writes under ~ lands here, not in the real home
        home.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(home)}
        common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats",
                  "--object-store-memory=150000000"]
        ray_cli = str(Path(sys.executable).parent / "ray")
        self.procs: list[subprocess.Popen] = []
        self.seen: set[int] = set()
        try:
            self._start_nodes(ray_cli, head_resources, worker_resources, common)
        except BaseException:
            self.stop()  # a node that failed to come up must not leave the other one running
            raise

    def _start_nodes(self, ray_cli: str, head_resources: dict[str, float], worker_resources: dict[str, float],
                     common: list[str]) -> None:
        self._start([ray_cli, "start", "--head", f"--port={self.port}", "--include-dashboard=false",
                     f"--temp-dir={self.temp / 'h'}", f"--resources={json.dumps(head_resources)}", *common], "head")
        self._wait_for_nodes(1)
        self._start([sys.executable, "-c", _WORKER_CLI, "start", f"--address={self.address}",
                     f"--temp-dir={self.temp / 'w'}", f"--resources={json.dumps(worker_resources)}", *common],
                    "worker")
        self._wait_for_nodes(2)

    def _start(self, command: list[str], name: str) -> None:
        log = open(self.base / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> None:
        """Until `count` raylets run under our processes (a raylet registers its node with the head)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a ray node exited with {proc.returncode}: see {self.base}/*.log")
            raylets = [p for p in self.family() if _name(p) == "raylet"]
            if len(raylets) >= count:
                time.sleep(3.0)  # registration with the GCS follows the raylet's start
                return
            time.sleep(1.0)
        raise TimeoutError(f"{count} ray node(s) not up after {timeout_s:.0f}s: see {self.base}/*.log")

    def family(self) -> list[int]:
        """PIDs of our node processes and all their descendants (recorded for the leak check)."""
        pids = []
        for proc in self.procs:
            try:
                parent = psutil.Process(proc.pid)
                pids += [parent.pid, *(c.pid for c in parent.children(recursive=True))]
            except psutil.NoSuchProcess:
                continue
        self.seen.update(pids)
        return pids

    def alive(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def stop(self) -> None:
        """SIGTERM to each node's `ray start --block` (it stops the processes it started), worker first."""
        self.family()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)


def _name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.NoSuchProcess:
        return ""
