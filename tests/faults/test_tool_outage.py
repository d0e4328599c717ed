"""A tool outage mid-run (issue 13 item 3): every replica of both search tools stops answering for a while, then comes
back.
Episodes cut by the outage are marked tool_failed and counted; none reaches the loss (a group left without contrast
is dropped, counted); training goes on to max_steps once the tool is back.

The outage is a pause, not a kill: each replica's process gets SIGSTOP and, once the actor has logged episodes cut
by it (at least MIN_OUTAGE_S, at most MAX_OUTAGE_S later), SIGCONT. The launcher does not restart a dead tool server
(a killed replica would stay down for the rest of the run), whereas a paused one is, to its clients, exactly a
server that went silent with its socket open: calls in flight get no reply, ZMQ's heartbeat (5 s) then marks the
replica disconnected, every call meets no live replica and fails at its deadline (`timeout`: an infrastructure
failure); once resumed, the clients reconnect on their own. Only processes this launch started are signalled (their
pids from the run folder's roles.json, checked against launch.py's process tree).

The smoke policy searches in ~5-25% of its episodes (image or text search, whichever its warm start favours: on a
fresh clone it was mostly text, so an image-only outage cut nothing), and at an lr of FROZEN_LR it keeps doing so for
the whole run, so a step during the outage waits for its cut episodes' deadline (3 s) while steps before and after it take ~0.4-3
s: it ends on evidence rather than after a fixed time, STEPS leaves room after it, and the steps trained
after it are read from the learner's log (its metrics rows reach metrics.jsonl late while the launcher's stats
call waits for the paused replica). Measured on 2 shared cores: 2 min with the smoke warm start cached, 4.5-5 min
on a busy box or when this launch builds it (most of it start-up).
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))  # LaunchWatch lives beside the e2e tests
from test_launch import NO_REPORT, QUICK_STOP, LaunchWatch  # noqa: E402

from launcher.audit import audit_run  # noqa: E402
from launcher.run_folder import rl_rows  # noqa: E402

STEPS = 30
FROZEN_LR = 1e-9  # the policy keeps the warm start's searching: at the default lr it can stop image-searching within
                  # a step or two, and then the outage cuts nothing and no longer slows the steps, so the whole run
                  # could finish inside it (seen at load 5-18 on 2 cores)
GROUP_SIZE = 8
TOOLS = ("image_search", "text_search")  # every replica of both: a search of either kind meets the outage
MIN_OUTAGE_S = 10.0  # beyond ZMQ's 5 s heartbeat: the replica is seen down, not only slow
MAX_OUTAGE_S = 120.0


def _training_rows(run: LaunchWatch) -> list[dict]:
    """RL rows (the warm start's SFT rows, when this launch trained it, carry no `trajectories`)."""
    return rl_rows(run.rows())


def _replicas(run: LaunchWatch, tool: str) -> list[dict]:
    """`tool`'s replicas from roles.json, each checked to be a ToolServerRole process under this launch.py."""
    replicas = [s for s in json.loads((run.out / "roles.json").read_text())["tool_servers"] if s["tool"] == tool]
    family = {p.pid for p in psutil.Process(run.proc.pid).children(recursive=True)}
    assert replicas and all(s["pid"] in family for s in replicas), f"{replicas} not under launch.py {run.proc.pid}"
    for replica in replicas:
        assert "ToolServerRole" in " ".join(psutil.Process(replica["pid"]).cmdline()), replica
    return replicas


def _episodes_cut(run: LaunchWatch) -> int:
    """Episodes the actor has logged as cut by the outage so far (actors/episode.py's warning)."""
    log = run.out / "logs" / "actor0.log"
    return log.read_text(errors="replace").count("the episode is tool_failed") if log.exists() else 0


def _steps_logged_after(run: LaunchWatch, when: float) -> list[int]:
    """Learner steps whose line in learner0.log ("[date time,ms][learner.role][INFO] - step N: loss ...") is
    stamped after `when` (time.time())."""
    pattern = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[learner\.role\]\[INFO\] - "
                         r"step (\d+): loss")
    steps = []
    for line in (run.out / "logs" / "learner0.log").read_text(errors="replace").splitlines():
        match = pattern.match(line)
        if match and datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() > when:
            steps.append(int(match[2]))
    return steps


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_outage_of_every_search_replica_is_kept_out_of_the_loss_and_training_goes_on(tmp_path):
    from testkit import solid_png
    from tool_servers.client import SyncToolClient

    run = LaunchWatch(tmp_path / "run", f"run.max_steps={STEPS}", "actors.num_actors=1", "learner.world_size=1",
                      f"algo.group_size={GROUP_SIZE}", "actors.episode.tool_deadline_s=3", QUICK_STOP, NO_REPORT,
                      "algo.stale_policy=train",  # a stale group is trained, not dropped: its cut episodes meet the mask
                      f"learner.lr={FROZEN_LR}")
    paused: list[int] = []
    try:
        run.wait(until=lambda: (run.out / "roles.json").exists() and len(_training_rows(run)) >= 1)
        assert run.proc.poll() is None, f"launch.py ended before step 1:\n{run.output[-6000:]}"
        replicas = {tool: _replicas(run, tool) for tool in TOOLS}
        for replica in (r for tool in TOOLS for r in replicas[tool]):
            os.kill(replica["pid"], signal.SIGSTOP)
            paused.append(replica["pid"])
        out_at = time.monotonic()
        run.wait(until=lambda: time.monotonic() - out_at > MAX_OUTAGE_S
                 or (time.monotonic() - out_at > MIN_OUTAGE_S and _episodes_cut(run) >= 2))
        assert run.proc.poll() is None, f"launch.py ended during the outage:\n{run.output[-6000:]}"
    finally:
        for pid in paused:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    outage_s, back_at = time.monotonic() - out_at, time.time()
    with SyncToolClient([r["endpoint"] for r in replicas["image_search"]], default_deadline_s=20.0) as client:
        reply = client.call("image_search", {"image": solid_png((200, 40, 40))})  # the tools are back: they answer
    assert reply.ok and reply.items, reply
    with SyncToolClient([r["endpoint"] for r in replicas["text_search"]], default_deadline_s=20.0) as client:
        reply = client.call("text_search", {"query": "who made it"})
    assert reply.ok, reply
    run.wait()
    after = _steps_logged_after(run, back_at)
    print(f"tool outage launch: {run.seconds:.0f}s; outage {outage_s:.0f}s; steps trained after it: {after}")
    assert run.proc.returncode == 0, run.output[-6000:]

    rows = _training_rows(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), run.output[-3000:]
    for row in rows:  # no tool_failed episode reached the loss, in any step
        assert row["loss_trajectories"] == row["trajectories"] - row["tool_failed_masked"], row
        assert row["loss_trajectories"] >= 2 * row["groups"], row  # every trained group kept its contrast
    last = rows[-1]
    # Counted on both sides: the actors that played them, the learner that left them out (or dropped their group).
    assert last["tool_failed_episodes"] > 0 and last.get("actor_tool_failed_episodes", 0) > 0, last
    # Every flagged episode the learner took was left out of a trained group or went with a dropped one (a group of
    # GROUP_SIZE is dropped with at least GROUP_SIZE - 1 flagged).
    masked, dropped = sum(r["tool_failed_masked"] for r in rows), last["tool_failed_groups_dropped"]
    assert last["tool_failed_episodes"] >= masked + (GROUP_SIZE - 1) * dropped, last
    assert masked + dropped > 0, last  # stale groups are trained here, so the learner's exclusion really ran
    print(f"tool_failed episodes: {last['tool_failed_episodes']:.0f} (learner), "
          f"{last.get('actor_tool_failed_episodes', 0):.0f} (actors); groups dropped: {dropped:.0f}; "
          f"left out of trained groups: {masked:.0f}")
    # Group by group (launcher/audit.py): none lost or trained twice; the ledger agrees with the counters.
    audit = audit_run(run.out)
    print(audit.text())
    assert audit.clean, audit.text()
    assert audit.trained == last["trained_groups"] == sum(r["groups"] for r in rows), audit.text()
    assert len(audit.dropped.get("tool_failed", [])) == dropped, audit.text()
    assert set(audit.dropped) <= {"tool_failed"}, audit.text()  # stale groups are trained here
    # Training went on once the tool was back.
    assert after and after[-1] == STEPS, f"no step was trained after the outage ({after})"
    for tool in TOOLS:  # answering their stats again
        assert last.get(f"tool_{tool}_replicas") == len(replicas[tool]), last
    run.assert_nothing_left()
