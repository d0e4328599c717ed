"""The metrics path of a run: actor and tool summaries, throughput, the sinks (jsonl, TensorBoard, a failing
optional sink), the progress display (terminal and log line), and the plots command."""
from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.metrics import summarize_actors, summarize_tools, with_throughput
from launcher.plots import PlotError, plot_run, read_rows
from launcher.progress import ProgressDisplay, status_text
from launcher.sinks import Sinks, TensorBoardSink

ROOT = Path(__file__).resolve().parents[2]


def test_actor_summary_counts_actors_and_keeps_the_slowest_tool_latency():
    snapshots = [
        {"actor_policy_version": 3, "actor_episodes": 8, "actor_weight_updates": 2, "actor_tool_failed_episodes": 3,
         "actor_tool_client_image_search_latency_ms_p50": 10.0, "actor_tool_client_image_search_latency_ms_p99": 40.0,
         "actor_tool_client_image_search_latency_ms_count": 99.0},
        {"actor_policy_version": 2, "actor_episodes": 4, "actor_weight_update_s_p50": 0.3,
         "actor_tool_client_image_search_latency_ms_p50": 25.0},
    ]
    view = summarize_actors(snapshots)
    assert view["actors_reporting"] == 2 and view["actor_episodes"] == 12 and view["actor_weight_updates"] == 2
    assert view["actor_tool_failed_episodes"] == 3  # episodes a tool outage ended, over all actors
    assert (view["actor_policy_version_min"], view["actor_policy_version_max"]) == (2, 3)
    assert view["tool_client_image_search_latency_ms_p50"] == 25.0
    assert view["tool_client_image_search_latency_ms_p99"] == 40.0
    assert "tool_client_image_search_latency_ms_count" not in view  # only percentiles
    assert summarize_actors([]) == {}


def test_tool_summary_adds_replicas_requests_errors_and_takes_the_worst_percentile():
    stats = [("image_search", {"requests": 10, "error_timeout": 1, "latency_ms_p50": 3.0, "latency_ms_p99": 9.0}),
             ("image_search", {"requests": 5, "error_overloaded": 2, "latency_ms_p50": 4.0}),
             ("text_search", {"requests": 0})]
    view = summarize_tools(stats)
    assert view["tool_image_search_replicas"] == 2 and view["tool_image_search_requests"] == 15
    assert view["tool_image_search_errors"] == 3 and view["tool_image_search_latency_ms_p50"] == 4.0
    assert view["tool_image_search_latency_ms_p99"] == 9.0
    assert view["tool_text_search_replicas"] == 1 and "tool_text_search_latency_ms_p50" not in view


def test_tool_summary_sums_snapshot_and_latency_model_counters_over_replicas():
    stats = [("text_search", {"requests": 4, "snapshot_hits": 3, "snapshot_misses": 1, "latency_injected_s": 1.5,
                              "latency_injected_count": 4}),
             ("text_search", {"requests": 2, "snapshot_hits": 2, "latency_injected_s": 0.5, "latency_injected_count": 2,
                              "latency_past_deadline": 1}),
             ("image_search", {"requests": 1})]
    view = summarize_tools(stats)
    assert view["tool_text_search_snapshot_hits"] == 5 and view["tool_text_search_snapshot_misses"] == 1
    assert view["tool_text_search_latency_injected_s"] == 2.0 and view["tool_text_search_latency_injected_count"] == 6
    assert view["tool_text_search_latency_past_deadline"] == 1
    assert not any(k.startswith("tool_image_search_snapshot") or "latency_injected" in k and "image" in k
                   for k in view)


def test_throughput_uses_the_learner_cycle_else_the_wall_interval():
    row = with_throughput({"tokens_generated": 300, "groups": 2, "learner_idle_s": 1.0, "step_time_s": 1.5,
                           "publish_s": 0.5}, previous_wall_s=0.0, wall_s=100.0)
    assert row["rollout_tokens_per_s"] == 100.0 and row["rollout_groups_per_s"] == pytest.approx(2 / 3)
    row = with_throughput({"tokens_generated": 50, "groups": 1}, previous_wall_s=10.0, wall_s=15.0)
    assert row["rollout_tokens_per_s"] == 10.0 and row["rollout_groups_per_s"] == 0.2


def _row(step: int, **extra) -> dict:
    return {"step": step, "policy_version": step, "reward_mean": 0.1 * step, "accuracy": 0.5, "search_ratio": 0.25,
            "staleness_mean": 0.5, "staleness_max": 1, "learner_idle_frac": 0.2, "rollout_tokens_per_s": 120.0,
            "rollout_groups_per_s": 0.5, "actor_episodes": 8, "tool_image_search_latency_ms_p50": 3.0,
            "flag": True, "note": "text", **extra}


def test_sinks_write_jsonl_and_tensorboard_and_drop_a_failing_optional_sink(tmp_path, caplog):
    sinks = Sinks(tmp_path, {"tensorboard": True, "wandb": {"project": None}}, {})
    assert sinks.names == ["jsonl", "TensorBoardSink"]

    class Broken:
        def write(self, row):
            raise OSError("disk full")

        def close(self):
            pass

    sinks._optional.append(Broken())
    with caplog.at_level(logging.ERROR):
        for step in (1, 2):
            sinks.write(_row(step))
    sinks.close()
    assert "Broken failed" in caplog.text and len(sinks._optional) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["note"] == "text"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"rollout/reward_mean", "rollout/search_ratio", "staleness/staleness_max", "actor/actor_episodes",
            "tool/tool_image_search_latency_ms_p50", "learner/learner_idle_frac"} <= tags
    assert not any(t.endswith(("flag", "note", "/step")) for t in tags)  # booleans, text and the x axis
    assert [e.value for e in events.Scalars("rollout/reward_mean")] == pytest.approx([0.1, 0.2])


def test_tensorboard_tags_group_metrics():
    assert TensorBoardSink.tag("search_ratio_search_free") == "rollout/search_ratio_search_free"
    assert TensorBoardSink.tag("loss") == "learner/loss"
    assert TensorBoardSink.tag("peak_mem_gib") == "system/peak_mem_gib"


def test_progress_is_a_log_line_off_terminal_and_a_live_bar_on_one(caplog):
    from rich.console import Console

    row = _row(3, reward_mean=0.625, search_ratio=0.375)
    assert "v3" in status_text(row) and "reward 0.625" in status_text(row) and "SR 0.38" in status_text(row)
    assert "120 tok/s" in status_text(row) and "0.50 groups/s" in status_text(row)
    plain = ProgressDisplay(10, console=Console(file=io.StringIO(), force_terminal=False))
    with caplog.at_level(logging.INFO, logger="forage.progress"):
        plain.update(row)
    plain.close()
    assert not plain.live and "step 3/10" in caplog.text

    screen = io.StringIO()
    live = ProgressDisplay(10, console=Console(file=screen, force_terminal=True, width=200))
    assert live.live
    live.update(row)
    live.close()
    assert "3/10" in screen.getvalue() and "reward 0.625" in screen.getvalue()
    ProgressDisplay(10, enabled=False).update(row)  # off: nothing, no error


def test_plots_write_pngs_for_the_metrics_present(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [_row(1, search_ratio_search_free=0.1, search_ratio_search_required=0.9,
                 tool_client_image_search_latency_ms_p99=12.0), _row(2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps({"table": [
        {"group": "all", "accuracy": 0.5, "searched": 0.25}, {"group": "label=search_free", "accuracy": 0.7,
                                                             "searched": 0.1}]}))
    written = {p.name for p in plot_run(run)}
    assert written == {"reward.png", "accuracy.png", "search_ratio.png", "staleness.png", "throughput.png",
                       "tool_latency.png", "learner_idle.png", "eval_by_group.png"}
    for name in written:
        assert (run / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward_mean": 0.5}) + "\n")
    (run / "eval" / "summary.json").unlink()
    assert {p.name for p in plot_run(run, tmp_path / "few")} == {"reward.png"}  # the rest: no data, skipped


def test_plots_refuse_a_folder_without_metrics(tmp_path):
    with pytest.raises(PlotError, match="does not exist"):
        read_rows(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(PlotError, match="no rows"):
        read_rows(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(PlotError, match=r"metrics.jsonl:2: not JSON"):
        read_rows(tmp_path)
    done = subprocess.run([sys.executable, "-m", "launcher.plots", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "does not exist" in done.stderr


def test_wandb_only_when_installed_and_configured(tmp_path, monkeypatch, caplog):
    from launcher.sinks import WandbSink

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert WandbSink.maybe({"project": None}, tmp_path, {}) is None  # not configured: silently off
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed (import fails)
    with caplog.at_level(logging.WARNING):
        assert WandbSink.maybe({"project": "forage"}, tmp_path, {}) is None
    assert "wandb is not installed" in caplog.text
    sinks = Sinks(tmp_path, {"tensorboard": False, "wandb": {"project": "forage"}}, {})
    assert sinks.names == ["jsonl"]
    sinks.close()
