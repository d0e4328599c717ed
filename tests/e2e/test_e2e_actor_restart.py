"""A rollout actor's process killed with SIGKILL mid-run (as the OOM killer or a segfault would end it): Ray restarts
it, the launcher's supervisor starts and runs it again, its spool re-plays (and resends) what the dead process left, and
the run reaches max_steps with nothing lost and nothing left behind, as the group ledger's audit (launcher/audit.py)
confirms group by group.

One actor and max_staleness 0: after step 1 the learner grants exactly the two groups of step 2, and the actor is
killed while it plays them. No further admission fits until step 2 is trained, so step 2 can only be trained from
the groups the restarted process re-plays from its spool: a lost grant would hang the run. Measured on 2 cores
shared with another training run: 138-160 s in all, of which ~45 s is the restart (a new vLLM engine); 195 s (90 s)
on a busier box.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from test_launch import NO_REPORT, QUICK_STOP, LaunchWatch

from launcher.audit import audit_run

STEPS = 2


def _rollout_actors(run: LaunchWatch) -> list[psutil.Process]:
    """The RolloutActor worker processes under launch.py (Ray titles them ray::RolloutActor[.method])."""
    try:
        family = psutil.Process(run.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in family:
        try:
            if " ".join(proc.cmdline()).startswith("ray::RolloutActor"):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _spool(run_dir: Path) -> tuple[list[Path], list[Path]]:
    spool = run_dir / "actors" / "actor0" / "spool"
    return sorted(spool.glob("grants/*.json")), sorted(spool.glob("groups/*.msgpack"))


def _wait_for_grants(run: LaunchWatch, version: int, count: int, timeout: float = 400) -> None:
    """Poll the spool every 20 ms (the process tree every second) until `count` grants at `version` are recorded."""
    deadline = time.monotonic() + timeout
    next_tree = 0.0
    while True:
        if time.monotonic() >= next_tree:
            assert run.poll(), f"launch.py exited before step 2 was granted:\n{run.output[-6000:]}"
            next_tree = time.monotonic() + 1.0
        versions = []
        for path in _spool(run.out)[0]:
            try:
                versions.append(json.loads(path.read_text())["version"])
            except FileNotFoundError:  # its group was spooled meanwhile
                continue
        if sum(v == version for v in versions) >= count:
            return
        assert time.monotonic() < deadline, f"no {count} grants at version {version} within {timeout:.0f}s"
        time.sleep(0.02)


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_rollout_actor_is_restarted_and_the_run_loses_nothing(tmp_path):
    run = LaunchWatch(tmp_path / "run", f"run.max_steps={STEPS}", "actors.num_actors=1", "algo.group_size=4",
                      "algo.groups_per_step=2", "algo.max_staleness=0", "actors.max_groups_in_flight=2",
                      "learner.world_size=1", QUICK_STOP, NO_REPORT)
    # Once step 1 is trained, wait until the actor plays both groups of step 2 (granted at version 1) at once: then it
    # is not between an admission reply and recording it (no grant can vanish with the process), and the spool
    # holds both grants. They play for about a second: watch the spool closely.
    _wait_for_grants(run, version=1, count=2)
    granted_s = time.monotonic() - run.started
    [victim] = _rollout_actors(run)
    engines = victim.children(recursive=True)  # its vLLM engine processes: they must not outlive it for long
    victim.kill()  # SIGKILL to this one process (a Ray worker this test's launch started)
    killed_at = time.monotonic()
    psutil.wait_procs([victim], timeout=10)
    grants, groups = _spool(run.out)  # what the dead process left: the restarted one must re-play / resend it
    assert grants, (grants, groups)  # (one may have been spooled or even acked in the milliseconds before the kill)

    run.wait(until=lambda: all(_gone(p) for p in engines) or time.monotonic() - killed_at > 60)
    engines_gone_s = time.monotonic() - killed_at
    orphans = [(p.pid, p.name()) for p in engines if not _gone(p)]
    assert not orphans, f"engine processes of the killed actor outlived it by 60 s: {orphans}"
    run.wait()
    print(f"actor-restart launch: {run.seconds:.0f}s (step 2 granted at {granted_s:.0f}s, killed then; its engine "
          f"processes gone {engines_gone_s:.0f}s later)")
    print("\n".join(line for line in run.output.splitlines() if "actor0: " in line and "launcher.supervise" in line))

    assert run.proc.returncode == 0, run.output[-8000:]
    rows = run.rows()
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), run.output[-4000:]
    assert all(r["groups"] == 2 for r in rows), [r["groups"] for r in rows]
    last = rows[-1]
    # the supervisor restarted it once, and the new process reports again
    assert last["actor_restarts"] == 1 and last["actors_restarting"] == 0 and last["actors_reporting"] == 1, last
    assert "actor0: its process died" in run.output and "actor0: back" in run.output
    # the new process resent the unacked groups and re-played the admitted ones the dead one left on disk
    assert (last["actor_spool_resent"], last["actor_spool_replayed"]) == (len(groups), len(grants)), last
    # nothing given up or rejected; the learner trained every step's groups
    assert last["trained_groups"] == 2 * STEPS and last["groups_rejected"] == 0, last
    assert last["staleness_max"] == 0, last  # the re-played groups waited for the version they were granted at
    assert last["actor_group_failures"] == 0, last  # no group of the new process failed (or was given up)

    # Nothing lost: at the final checkpoint every admission the learner granted and has not received is on disk in
    # the actor's spool (a grant to re-play or a group to resend at the next start), and no group arrived twice or
    # without its admission (a re-played grant counted twice would show as `unexpected`).
    [final] = sorted((run.out / "checkpoints").glob("step_*"))[-1:]
    state = json.loads((final / "learner_state.json").read_text())
    assert state["trained_groups"] == 2 * STEPS and state["admission"]["unexpected"] == 0, state
    seen = set(state["seen_group_ids"])
    grants_left, groups_left = _spool(run.out)
    unseen = grants_left + [g for g in groups_left if g.stem not in seen]
    assert len(unseen) >= state["admission"]["running"], (state["admission"], grants_left, groups_left)

    # Group by group (the ledger): every group started was trained exactly once, or is pending where it waits (the
    # final checkpoint's buffer, the spool); the groups the dead process was playing were re-played under new ids
    # (regenerated), and none was lost or trained twice.
    audit = audit_run(run.out)
    print(audit.text())
    assert audit.clean, audit.text()
    assert audit.trained == 2 * STEPS and not audit.dropped, audit.text()
    # (a grant whose play had not begun when the process died has no started group to regenerate: hence <=)
    assert len(audit.regenerated) <= len(grants), (audit.text(), grants)

    roles = json.loads((run.out / "roles.json").read_text())
    [actor] = roles["actors"]
    assert actor["restarts"] == 1 and actor["pid"] != victim.pid, actor
    run.assert_nothing_left()
