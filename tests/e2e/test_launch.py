"""The whole system through launch.py: real Ray, vLLM, FSDP2 (gloo) and ZeroMQ on the embedded default.

One run of `launch.py run.max_steps=2` must write the metrics contract, advance the policy version on the actor
side, get tool calls answered, stop every process it started and listen on nothing but loopback.
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ("step", "policy_version", "groups", "trajectories", "tokens_generated", "reward_mean", "accuracy",
            "search_ratio", "image_searches", "text_searches", "tool_errors", "staleness_mean", "staleness_max",
            "learner_idle_frac", "step_time_s", "wall_time_s")


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _listeners_of(pids: set[int]) -> list[tuple[str, int]]:
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            found.append((conn.laddr.ip, conn.pid))
    return found


class LaunchWatch:
    """Runs launch.py as a subprocess and watches its process tree: every pid and every listening socket."""

    def __init__(self, out: Path, *overrides: str) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), f"run.out_dir={out}", "run.timeout_s=900", *overrides],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.seen: set[int] = set()
        self.wide: list[tuple[str, int]] = []
        self._chunks: list[bytes] = []

    def poll(self) -> bool:
        """Record the tree once; False when launch.py has exited."""
        if self.proc.poll() is not None:
            return False
        try:
            family = {self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            return False
        self.seen |= family
        self.wide += [(ip, pid) for ip, pid in _listeners_of(family) if not _is_loopback(ip)]
        self._chunks.append(self.proc.stdout.read() or b"")
        return True

    def wait(self, until=lambda: False) -> None:
        while self.poll() and not until():
            time.sleep(1.0)

    @property
    def output(self) -> str:
        if self.proc.poll() is not None:
            self._chunks.append(self.proc.stdout.read() or b"")
        return b"".join(self._chunks).decode(errors="replace")

    def rows(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def assert_nothing_left(self) -> None:
        assert not self.wide, f"listeners beyond loopback: {self.wide}"
        time.sleep(2)
        alive = []
        for pid in self.seen - {self.proc.pid}:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append((pid, psutil.Process(pid).cmdline()[:3]))
            except psutil.NoSuchProcess:
                continue
        assert not alive, f"processes left behind: {alive}"


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_launch_runs_two_async_steps_and_leaves_nothing_behind(tmp_path):
    run = LaunchWatch(tmp_path / "run", "run.max_steps=2")
    run.wait()
    output = run.output
    assert run.proc.returncode == 0, output[-6000:]
    out = run.out

    rows = run.rows()
    assert [r["step"] for r in rows] == [1, 2], output[-3000:]
    for row in rows:
        missing = [k for k in CONTRACT if k not in row]
        assert not missing, f"metrics row lacks {missing}"
        assert row["trajectories"] > 0 and row["tokens_generated"] > 0
    assert [r["policy_version"] for r in rows] == [1, 2]
    # The actor applied the learner's weights in place: it runs a newer version than the one it started with.
    assert rows[-1]["actor_policy_version_max"] >= 1 and rows[-1]["actor_weight_updates"] >= 1, rows[-1]
    assert sum(r["image_searches"] + r["text_searches"] for r in rows) > 0, "no tool call was answered"
    assert (out / "config.yaml").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["peak_mem_gib"] < 12

    run.assert_nothing_left()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ctrl_c_mid_run_stops_every_process_it_started(tmp_path):
    run = LaunchWatch(tmp_path / "run", "run.max_steps=1000")
    run.wait(until=lambda: len(run.rows()) >= 1)
    assert run.proc.poll() is None, run.output[-6000:]
    run.proc.send_signal(signal.SIGINT)
    run.wait()
    assert run.proc.returncode == 130, run.output[-6000:]
    assert "interrupted: stopping every role" in run.output
    assert (run.out / "summary.json").exists()
    run.assert_nothing_left()
