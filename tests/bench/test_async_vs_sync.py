"""bench/async_vs_sync.py's arithmetic from hand-made metrics rows: the figures per run, the async/sync ratio, the
overlap bound of the sync run's phases and the share of it reached; and the overrides each run gets."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "async_vs_sync.py"


@pytest.fixture(scope="module")
def bench():
    # loaded by path: bench/ is no package, and running from bench/ would let bench/actors.py shadow actors/
    spec = importlib.util.spec_from_file_location("bench_async_vs_sync", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(step, idle, train, publish, trajectories=64, tokens=2000, staleness=0.0, staleness_max=0, reward=0.5,
        wall=None):
    out = {"step": step, "trajectories": trajectories, "tokens_generated": tokens, "learner_idle_s": idle,
           "step_time_s": train, "publish_s": publish, "staleness_mean": staleness, "staleness_max": staleness_max,
           "reward_mean": reward, "learner_idle_frac": idle / (idle + train + publish)}
    if wall is not None:
        out["wall_time_s"] = wall
    return out


def test_the_overlap_bound_is_the_serial_step_over_the_overlapped_one(bench):
    assert bench.overlap_bound(3.0, 1.0, 0.0) == pytest.approx(4 / 3)  # rollout-bound: train hides in rollout
    assert bench.overlap_bound(6.0, 2.0, 0.5) == pytest.approx(8.5 / 6.5)
    assert bench.overlap_bound(2.0, 2.0, 0.0) == pytest.approx(2.0)  # balanced phases: the best case, 2x
    assert bench.overlap_bound(1.0, 3.0, 1.0) == pytest.approx(5 / 4)  # train-bound
    assert bench.overlap_bound(0.0, 0.0, 0.0) == 1.0


def test_run_figures_skip_the_warmup_and_weight_staleness_by_tokens(bench):
    rows = [
        row(1, idle=100.0, train=1.0, publish=0.1, reward=0.0),  # start-up lands in the first wait: left out
        {"step": 1, "eval/policy/accuracy": 0.25},  # held-out rows are no training steps
        row(2, idle=3.0, train=1.0, publish=0.0, tokens=1000, staleness=1.0, staleness_max=1, reward=0.2),
        row(3, idle=1.0, train=2.0, publish=1.0, tokens=3000, staleness=0.0, staleness_max=2, reward=0.4),
        {"step": 3, "eval/policy/accuracy": 0.5},
    ]
    f = bench.run_figures(rows, warmup=1)
    cycle = 4.0 + 4.0  # two measured steps of 4 s each
    assert f["steps"] == 2
    assert f["trajectories_per_s"] == pytest.approx(128 / cycle)
    assert f["tokens_per_s"] == pytest.approx(4000 / cycle)
    assert f["learner_idle_frac"] == pytest.approx(4.0 / cycle)  # summed waits over summed cycles
    assert f["rollout_wait_s"] == pytest.approx(2.0) and f["train_s"] == pytest.approx(1.5)
    assert f["publish_s"] == pytest.approx(0.5) and f["step_cycle_s"] == pytest.approx(4.0)
    assert f["staleness_mean"] == pytest.approx((1.0 * 1000 + 0.0 * 3000) / 4000) and f["staleness_max"] == 2
    assert f["final_reward"] == pytest.approx((0.0 + 0.2 + 0.4) / 3)  # the last FINAL_REWARD_STEPS steps (all 3)
    assert f["heldout_accuracy"] == 0.5  # the last held-out pass
    with pytest.raises(ValueError, match="no training step"):
        bench.run_figures(rows[:2], warmup=1)


def test_run_figures_split_the_idle_fraction_by_cause(bench):
    rows = [row(1, 9.0, 1.0, 0.0), row(2, 3.0, 1.0, 0.0), row(3, 1.0, 2.0, 1.0)]
    rows[1].update(learner_idle_staleness_bound_s=2.0, learner_idle_actor_limit_s=1.0, learner_idle_no_rollouts_s=0.0)
    rows[2].update(learner_idle_staleness_bound_s=0.0, learner_idle_actor_limit_s=0.5, learner_idle_no_rollouts_s=0.5)
    f = bench.run_figures(rows, warmup=1)
    assert f["idle_staleness_bound_frac"] == pytest.approx(2.0 / 8.0)
    assert f["idle_actor_limit_frac"] == pytest.approx(1.5 / 8.0)
    assert f["idle_no_rollouts_frac"] == pytest.approx(0.5 / 8.0)
    assert bench.idle_split(f) == "bound 25.0% retry 0.0% actors 18.8% none 6.2%"


def test_run_figures_measure_the_wall_clock_too_when_rows_have_it(bench):
    rows = [row(1, 50.0, 1.0, 0.0, wall=60.0), row(2, 1.0, 1.0, 0.0, wall=62.5), row(3, 1.0, 1.0, 0.0, wall=65.0)]
    f = bench.run_figures(rows, warmup=1)
    assert f["wall_trajectories_per_s"] == pytest.approx(128 / 5.0)
    assert "heldout_accuracy" not in f


def test_ratio_bound_and_share_from_a_sync_and_an_async_run(bench):
    # sync: rollout 3 s, train 1 s, publish 0 s per step -> 4 s a step; bound (3 + 1) / 3 = 1.33x
    sync = bench.run_figures([row(1, 9.0, 1.0, 0.0)] + [row(k, 3.0, 1.0, 0.0) for k in (2, 3, 4)], warmup=1)
    # async: the learner waits 2 s, trains 1 s -> 3 s a step: 4/3 = 1.33x, the whole bound
    done = bench.run_figures([row(1, 9.0, 1.0, 0.0)] + [row(k, 2.0, 1.0, 0.0, staleness=0.5) for k in (2, 3, 4)],
                             warmup=1)
    cell = bench.compare(sync, done)
    assert cell["ratio"] == pytest.approx(4 / 3) and cell["bound"] == pytest.approx(4 / 3)
    assert cell["share_of_bound"] == pytest.approx(1.0)
    # an async run only 1.1x faster reaches 0.825 of that bound
    slower = dict(done, trajectories_per_s=sync["trajectories_per_s"] * 1.1)
    assert bench.compare(sync, slower)["share_of_bound"] == pytest.approx(1.1 / (4 / 3))


def test_the_summary_averages_seeds_and_heads_with_the_first_eta_and_actor_count(bench):
    runs = {}
    comparisons = {}
    for seed, ratio in ((0, 1.2), (1, 1.4)):
        for eta in (1, 2):
            runs[bench.run_name("async", eta, 1, seed)] = {"learner_idle_frac": 0.1 * eta + 0.02 * seed}
            comparisons[f"a1-s{seed}-eta{eta}"] = {"ratio": ratio * eta, "bound": 2.0, "share_of_bound": ratio * eta / 2}
    summary = bench.summarize({"runs": runs, "comparisons": comparisons}, etas=[1, 2], actors=[1], seeds=[0, 1])
    head = summary["headline"]
    assert head["eta"] == 1 and head["actors"] == 1
    assert head["ratio"] == pytest.approx(1.3) and head["ratio_per_seed"] == [1.2, 1.4]
    assert head["async_learner_idle_frac"] == pytest.approx(0.11)
    assert summary["by_config"]["a1-eta2"]["ratio"] == pytest.approx(2.6)


def test_each_run_gets_the_latency_model_and_its_mode(bench, tmp_path):
    args = argparse.Namespace(steps=6, run_timeout_s=900, sigma=0.7, heldout=0, override=["actors.max_concurrency=32"])
    sync = bench.launch_overrides("sync", 0, 2, 1, args, tmp_path / "s")
    assert "run.mode=sync" in sync and "run.max_steps=6" in sync and "actors.num_actors=2" in sync
    assert not any(o.startswith("algo.max_staleness") for o in sync)  # sync pins it to 0 itself
    for section in ("image", "text"):
        assert {f"tool_servers.{section}.latency.enabled=true", f"tool_servers.{section}.latency.sigma=0.7",
                f"tool_servers.{section}.latency.seed=1"} <= set(sync)
    assert "run.report.enabled=false" in sync and sync[-1] == "actors.max_concurrency=32"
    args.heldout = 16
    asynchronous = bench.launch_overrides("async", 4, 1, 0, args, tmp_path / "a")
    assert "run.mode=async" in asynchronous and "algo.max_staleness=4" in asynchronous
    assert "run.report.per_label=16" in asynchronous and "run.report.every=0" in asynchronous
    assert bench.run_name("async", 4, 1, 0) == "async-eta4-a1-s0" and bench.run_name("sync", 0, 2, 1) == "sync-a2-s1"


def test_figures_of_finished_runs_launch_nothing(bench, tmp_path, capsys):
    rows = [row(1, 9.0, 1.0, 0.0), row(2, 3.0, 1.0, 0.0), row(3, 1.0, 2.0, 1.0)]
    rows[2].update(learner_idle_actor_limit_s=1.0)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert bench.main(["--figures", str(tmp_path), "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "idle  50.0% (bound 0.0% retry 0.0% actors 12.5% none 0.0%)" in out
    with pytest.raises(SystemExit, match="no metrics.jsonl rows"):
        bench.main(["--figures", str(tmp_path / "missing")])
