"""The supervisor of rollout actors on a real private Ray cluster: a killed actor process is restarted by Ray and
started and run again by `Supervisor.supervise_actors`; an actor whose code raises, or that runs out of restarts,
fails the run naming the actor; metrics skip a restarting actor; stop() ends every process.

The actor here is a stand-in with the RolloutActor call protocol (start, run, stop, metrics) and no engine, so the
test exercises the launcher and Ray, not vLLM (tests/e2e/test_e2e_actor_restart.py kills a real RolloutActor). Its
behaviour for the *next* process is set through files in its folder, since a restarted process re-runs __init__.
The Ray tests are marked slow (one Ray cluster per module, ~6 s; ~22 s in all on 2 shared cores).
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from launcher.cluster import RayCluster, SocketAlias
from launcher.metrics import summarize_actors
from launcher.start import Roles, actor_restart_options
from launcher.supervise import ActorFailed, Supervisor


class StandInActor:
    """The RolloutActor protocol in a few lines. Files in `folder`: `start_raises`, `run_raises` (raise there),
    `starts` (one pid per start() call)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.stopping: asyncio.Event | None = None

    async def start(self) -> None:
        if (self.folder / "start_raises").exists():
            raise RuntimeError("start failed on purpose")
        self.stopping = asyncio.Event()
        with open(self.folder / "starts", "a") as starts:
            starts.write(f"{os.getpid()}\n")

    async def run(self) -> None:
        if self.stopping is None:
            raise RuntimeError("run() before start()")
        if (self.folder / "run_raises").exists():
            raise ValueError("a group failed on purpose")
        await self.stopping.wait()

    async def stop(self, timeout_s: float | None = None) -> None:
        if self.stopping is not None:
            self.stopping.set()

    def metrics(self) -> dict[str, float]:
        return {"actor_episodes": 1.0, "actor_pid": float(os.getpid())}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "PYTHONPATH")}
    # Ray workers import StandInActor from this module (RayCluster forwards PYTHONPATH to them).
    here, root = Path(__file__).resolve().parent, Path(__file__).resolve().parents[2]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), str(here), saved["PYTHONPATH"]) if p)
    run_dir = tmp_path_factory.mktemp("supervise")
    sockets = SocketAlias(run_dir)
    cluster = RayCluster({"ray_address": "local", "ray_temp_dir": None, "ray_num_cpus": 4, "ray_object_store_mb": 80},
                         run_dir, sockets.path)
    yield cluster
    cluster.shutdown()
    sockets.remove()
    for key, value in saved.items():  # set for the workers of this cluster only; do not leak them
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def make_supervisor(folders: list[Path], max_restarts: int) -> Supervisor:
    """The supervisor of stand-in actors created exactly as Roles.start_actors creates rollout actors (restart
    options)."""
    import ray

    from launcher.placement import where_am_i

    # verbose: the stand-ins are created here, not through Roles.start_*, so no role logs are routed
    run = {"placement_timeout_s": 60, "actor_max_restarts": max_restarts, "placement": {}, "verbose": True}
    roles = Roles({"run": run})
    remote = ray.remote(StandInActor).options(num_cpus=0, **actor_restart_options(run))
    roles.actors = [remote.remote(str(folder)) for folder in folders]
    ray.get([a.start.remote() for a in roles.actors])
    places = ray.get([a.__ray_call__.remote(where_am_i) for a in roles.actors])
    roles.where["actors"] = [{**p, "actor_id": f"actor{i}"} for i, p in enumerate(places)]
    supervisor = Supervisor(roles)
    supervisor.start_training(max_steps=0)  # no learner ranks: only the actors' run()
    return supervisor


def supervise_until(supervisor: Supervisor, done, timeout: float = 45.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, [(w.actor_id, w.phase, w.restarts, w.cause)
                                             for w in supervisor.actor_watch]
        supervisor.check_failures()
        time.sleep(0.2)


def starts(folder: Path) -> list[int]:
    path = folder / "starts"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_killed_actor_process_is_restarted_started_and_run_again(ray_cluster, tmp_path):
    folders = [tmp_path / "a0", tmp_path / "a1"]
    for folder in folders:
        folder.mkdir()
    supervisor = make_supervisor(folders, max_restarts=2)
    try:
        first = starts(folders[0])[0]
        other = starts(folders[1])[0]
        assert summarize_actors(supervisor.actor_metrics())["actor_episodes"] == 2  # each reports 1 episode
        os.kill(first, signal.SIGKILL)  # a process this test started (through Ray)
        supervise_until(supervisor, lambda: supervisor.actor_watch[0].phase != "running")
        watch = supervisor.actor_watch[0]
        assert watch.restarts == 1 and "Actor" in watch.cause, watch
        # while it restarts, metrics leave it out (and count it) instead of failing or hanging the loop
        snapshots = supervisor.actor_metrics()
        assert [s["actor_pid"] for s in snapshots] == [other]
        view = summarize_actors(snapshots, supervisor.actor_supervision())
        assert view["actor_restarts"] == 1 and view["actors_restarting"] == 1 and view["actors_reporting"] == 1
        assert view["actor_snapshots_missed"] == 1

        supervise_until(supervisor, lambda: supervisor.actor_watch[0].phase == "running")
        again = starts(folders[0])
        assert len(again) == 2 and again[1] != first  # start() re-issued, in a new process
        where = supervisor.roles.where["actors"][0]
        assert where["pid"] == again[1] and where["restarts"] == 1
        assert starts(folders[1]) == [other]  # the other actor was left alone
        assert gone(first)
        time.sleep(0.5)
        supervisor.check_failures()  # the new run() is running, nothing raised
        assert supervisor.actor_watch[0].phase == "running"
        snapshots = supervisor.actor_metrics()
        assert sorted(s["actor_pid"] for s in snapshots) == sorted([again[1], other])
        assert summarize_actors(snapshots)["actor_episodes"] == 3  # the dead process's episode is still counted
        assert supervisor.actor_supervision()["actors_restarting"] == 0
    finally:
        pids = [p for folder in folders for p in starts(folder)]
        supervisor.stop()
    time.sleep(1)
    assert all(gone(pid) for pid in pids), [p for p in pids if not gone(p)]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_actor_out_of_restarts_fails_the_run_naming_it(ray_cluster, tmp_path):
    supervisor = make_supervisor([tmp_path], max_restarts=1)
    try:
        os.kill(starts(tmp_path)[0], signal.SIGKILL)
        watch = supervisor.actor_watch[0]
        supervise_until(supervisor, lambda: watch.restarts == 1 and watch.phase == "running")
        os.kill(starts(tmp_path)[1], signal.SIGKILL)
        with pytest.raises(ActorFailed, match=r"actor0: its process died .* no restart left \(1 of "
                                              r"run.actor_max_restarts=1 used\)"):
            supervise_until(supervisor, lambda: False)
    finally:
        supervisor.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_error_raised_by_the_actor_fails_the_run_without_a_restart(ray_cluster, tmp_path):
    (tmp_path / "run_raises").touch()
    supervisor = make_supervisor([tmp_path], max_restarts=3)
    try:
        with pytest.raises(ActorFailed, match="(?s)rollout actor actor0 failed: .*a group failed on purpose"):
            supervise_until(supervisor, lambda: False)
        assert supervisor.actor_watch[0].restarts == 0 and len(starts(tmp_path)) == 1
    finally:
        supervisor.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_restarted_actor_whose_start_raises_fails_the_run(ray_cluster, tmp_path):
    supervisor = make_supervisor([tmp_path], max_restarts=3)
    try:
        (tmp_path / "start_raises").touch()  # for the next process
        os.kill(starts(tmp_path)[0], signal.SIGKILL)
        with pytest.raises(ActorFailed, match="(?s)actor0 failed to start again after its process died .*on purpose"):
            supervise_until(supervisor, lambda: False)
        assert supervisor.actor_watch[0].restarts == 1
    finally:
        supervisor.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_lost_call_to_a_live_actor_is_not_taken_for_a_restart(ray_cluster, tmp_path):
    from ray.exceptions import ActorUnavailableError

    supervisor = make_supervisor([tmp_path], max_restarts=3)
    try:
        # What a dropped connection looks like to the supervisor: run() failed as "unavailable", the process lives on.
        supervisor._actor_died(supervisor.actor_watch[0], ActorUnavailableError("RPC error: Socket closed", None),
                          time.monotonic())
        with pytest.raises(ActorFailed, match=r"actor0: its run\(\) call was lost .* never died; not restarting"):
            supervise_until(supervisor, lambda: False)
        assert len(starts(tmp_path)) == 1  # start() was not called a second time on the live process
    finally:
        supervisor.stop()


def test_actor_restart_options_come_from_the_run_config():
    assert actor_restart_options({"actor_max_restarts": 3}) == {"max_restarts": 3, "max_task_retries": 0}
    with pytest.raises(ValueError, match="actor_max_restarts must be >= 0, got -2"):
        actor_restart_options({"actor_max_restarts": -2})


def test_summarize_actors_with_every_actor_restarting_still_reports_the_restarts():
    supervision = {"actor_restarts": 2.0, "actors_restarting": 1.0, "actor_snapshots_missed": 3.0}
    assert summarize_actors([], supervision) == {**supervision, "actors_reporting": 0.0}
    view = summarize_actors([{"actor_spool_resent": 2.0, "actor_spool_replayed": 1.0}], supervision)
    assert view["actor_spool_resent"] == 2 and view["actor_spool_replayed"] == 1 and view["actor_restarts"] == 2
