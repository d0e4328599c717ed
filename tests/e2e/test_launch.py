"""The whole system through launch.py: real Ray, vLLM, FSDP2 (gloo) and ZeroMQ on the embedded default.

Five launches, each checking several things at once (measured on 2 shared cores: scaled 100-150 s, 245 s on a
busy box; eval 58 s; sync 70 s; curate 57 s; two-node 95 s with its cluster; the file ~6.5 min in all, plus the
world and tiny-model build, ~3 min, in the first launch of a fresh clone):
  1. async, scaled by overrides: 2 actors, 2 replicas per tool, 2 learner ranks, 2 steps -> metrics contract,
     roles.json placement, TensorBoard events, final checkpoint, plots of the run folder;
  2. eval of that run's checkpoint over an FVQA-style parquet (bytes in an `images` list, `reward_model` answers);
  3. sync mode (staleness 0), then Ctrl-C: actors flush, the learner checkpoints, every process ends;
  4. curate over an image folder (metadata.jsonl), k=2: labels and a balanced subset actors can read;
  5. two Ray nodes (head + worker on loopback) joined with run.ray_address: learner on one, actors on the other;
  6. algo=sft: the warm start alone on the learner ranks writes <run>/model, which curate (4) then serves on vLLM.
Every launch must stop all it started and listen on nothing but loopback.
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
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ("step", "policy_version", "groups", "trajectories", "tokens_generated", "reward_mean", "accuracy",
            "search_ratio", "image_searches", "text_searches", "tool_errors", "staleness_mean", "staleness_max",
            "learner_idle_frac", "step_time_s", "wall_time_s")
# At max_steps the learner's intake is closed; groups still in flight are spooled after this long (not 45 s).
QUICK_STOP = "actors.stop_timeout_s=10"
# Every launch here starts from the smoke configuration (conf/experiment/smoke.yaml: a small warm start, cached
# once for all of them, and a short held-out report); the tests override what they are about.
SMOKE = "+experiment=smoke"
NO_REPORT = "run.report.enabled=false"
ROLE_TITLES = ("ray::RolloutActor", "ray::LearnerRank", "ray::ToolServerRole", "VLLM::", "ray::eval_task",
               "ray::curate_task")


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _listeners_of(pids: set[int]) -> list[tuple[str, int]]:
    return [(conn.laddr.ip, conn.pid) for conn in psutil.net_connections(kind="inet")
            if conn.status == psutil.CONN_LISTEN and conn.pid in pids]


def _alive(pids: set[int]) -> list[tuple[int, list[str]]]:
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append((pid, proc.cmdline()[:3]))
        except psutil.NoSuchProcess:
            continue
    return alive


class LaunchWatch:
    """Runs launch.py as a subprocess and watches its process tree (plus `also()`): every pid, every listener."""

    def __init__(self, out: Path, *overrides: str, env: dict[str, str] | None = None, also=lambda: []) -> None:
        self.out = out
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), f"run.out_dir={out}", "run.timeout_s=900", SMOKE, *overrides],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            # A shell without job control starts background jobs with SIGINT ignored, and the child would inherit
            # that: the Ctrl-C tests need launch.py to take SIGINT as a terminal's Ctrl-C, wherever pytest runs.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.also = also
        self.seen: set[int] = set()
        self.wide: list[tuple[str, int]] = []
        self._chunks: list[bytes] = []
        self.seconds = 0.0

    def poll(self) -> bool:
        """Record the tree once; False when launch.py has exited."""
        self._chunks.append(self.proc.stdout.read() or b"")
        if self.proc.poll() is not None:
            self.seconds = time.monotonic() - self.started
            return False
        try:
            family = {self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            return False
        family |= set(self.also())
        self.seen |= family
        self.wide += [(ip, pid) for ip, pid in _listeners_of(family) if not _is_loopback(ip)]
        return True

    def wait(self, until=lambda: False) -> None:
        while self.poll() and not until():
            time.sleep(1.0)

    @property
    def output(self) -> str:
        if self.proc.poll() is not None:
            self._chunks.append(self.proc.stdout.read() or b"")
        return b"".join(self._chunks).decode(errors="replace")

    def all_rows(self) -> list[dict]:
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def rows(self) -> list[dict]:
        """The learner steps' rows, RL or warm start (held-out eval rows carry only `step` and eval/ keys)."""
        return [r for r in self.all_rows() if not _is_eval_row(r)]

    def eval_rows(self) -> list[dict]:
        return [r for r in self.all_rows() if _is_eval_row(r)]

    def assert_nothing_left(self, keep: set[int] = frozenset()) -> None:
        assert not self.wide, f"listeners beyond loopback: {self.wide}"
        time.sleep(2)
        alive = _alive(self.seen - {self.proc.pid} - set(keep))
        assert not alive, f"processes left behind: {alive}"


def _is_eval_row(row: dict) -> bool:
    return all(key == "step" or key.startswith("eval/") for key in row)


def _role_processes(pids) -> list[tuple[int, list[str]]]:
    """Processes that are forage roles or their engines (Ray names its workers ray::<Class>)."""
    return [(pid, cmd) for pid, cmd in _alive(set(pids)) if any(t in " ".join(cmd) for t in ROLE_TITLES)]


def _world_questions() -> Path:
    """The default world's questions parquet (built by the first launch; cached)."""
    from data import WorldConfig, ensure_world

    return Path(ensure_world(WorldConfig(), ROOT / ".forage_cache").questions)


# ---------------------------------------------------------------------------------------------- 1 + 2: scaled, eval

@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory) -> LaunchWatch:
    run = LaunchWatch(tmp_path_factory.mktemp("scaled") / "run", "run.max_steps=2", "actors.num_actors=2",
                      "actors.max_concurrency=8", "tool_servers.image.replicas=2", "tool_servers.text.replicas=2",
                      "learner.world_size=2", "algo.group_size=4", "algo.max_staleness=1", QUICK_STOP)
    run.wait()
    print(f"scaled launch: {run.seconds:.0f}s")
    return run


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_scaled_async_run_places_every_role_and_writes_every_sink(scaled_run):
    run = scaled_run
    assert run.proc.returncode == 0, run.output[-6000:]
    rows = run.rows()
    assert [r["step"] for r in rows] == [1, 2], run.output[-3000:]
    for row in rows:
        missing = [k for k in CONTRACT if k not in row]
        assert not missing, f"metrics row lacks {missing}"
        assert row["groups"] == 2 and row["trajectories"] == 2 * 4 and row["tokens_generated"] > 0
        assert row["actors_reporting"] == 2
        assert row["tool_image_search_replicas"] == 2 and row["tool_text_search_replicas"] == 2
        assert row["rollout_tokens_per_s"] > 0 and row["rollout_groups_per_s"] > 0
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert rows[-1]["actor_policy_version_max"] >= 1 and rows[-1]["actor_weight_updates"] >= 1, rows[-1]
    # The replicas served over their sockets (the search-path check and any policy search); whether the smoke policy
    # itself searches in these 16 episodes is up to its sampling (~5-25% of episodes; one fresh-clone run made none),
    # but every search it made was answered.
    assert sum(r["tool_image_search_requests"] + r["tool_text_search_requests"] for r in rows) > 0
    assert sum(r["tool_errors"] for r in rows) == 0, [r["tool_errors"] for r in rows]

    roles = json.loads((run.out / "roles.json").read_text())
    assert len(roles["actors"]) == 2 and len({a["pid"] for a in roles["actors"]}) == 2
    assert [r["rank"] for r in roles["learner"]] == [0, 1] and len({r["pid"] for r in roles["learner"]}) == 2
    for tool in ("image_search", "text_search"):
        replicas = [s for s in roles["tool_servers"] if s["tool"] == tool]
        assert len(replicas) == 2 and len({s["endpoint"] for s in replicas}) == 2

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("rollout/reward_mean")] == [1, 2]
    assert [e.value for e in events.Scalars("learner/policy_version")] == [1.0, 2.0]
    assert (run.out / "checkpoints" / "step_00000002" / "learner_state.json").is_file()  # final checkpoint
    summary = json.loads((run.out / "summary.json").read_text())
    assert 0 < summary["peak_mem_gib"] < 16
    # A quiet console: stage lines, progress and the summary; every role's (and library's) output in <run>/logs/
    logs = run.out / "logs"
    names = {p.name for p in logs.iterdir()} - {"warm_start0.log"}  # that one only when this launch warm-started
    assert names == {"launcher.log", "actor0.log", "actor1.log", "learner0.log", "learner1.log", "image_search0.log",
                     "image_search1.log", "text_search0.log", "text_search1.log"}, names
    assert "EngineCore" in (logs / "actor0.log").read_text() and "EngineCore" not in run.output
    assert "learner up: 2 rank(s)" in run.output and "step 2/2" in run.output
    assert "2 step(s) in" in run.output and "/metrics.jsonl  logs: " in run.output
    warm = [json.loads(line) for line in (run.out / "warm_start.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in warm if "step" in row]
    if steps:  # a fresh cache (CI's clean clone): this launch ran the tiny model's warm start on Ray
        assert steps == list(range(1, len(steps) + 1)) and len(steps) == 60, steps[-3:]  # conf/experiment/smoke
    run.assert_nothing_left()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)  # may be the test that starts the scaled launch
def test_the_run_ends_with_a_report_made_of_its_held_out_eval_rows(scaled_run):
    """conf/experiment/smoke's report: the policy and both baselines at step 0 and the policy at the end (step 2,
    every 2 steps), on 8 held-out questions per label, as metrics rows; report.json/md/png hold those numbers."""
    run = scaled_run
    assert run.proc.returncode == 0, run.output[-6000:]
    evals = run.eval_rows()
    passes = sorted((r["step"], mode) for r in evals for mode in ("policy", "always_search", "never_search",
                                                                   "workflow") if f"eval/{mode}/accuracy" in r)
    assert passes == [(0, "always_search"), (0, "never_search"), (0, "policy"), (0, "workflow"), (2, "policy")]
    for row in evals:
        (mode,) = {k.split("/")[1] for k in row if k.startswith("eval/")}
        assert row[f"eval/{mode}/n"] == 16 and row[f"eval/{mode}/n_search_free"] == 8
    report = json.loads((run.out / "report.json").read_text())
    by = {(r["step"], next(k.split("/")[1] for k in r if k.startswith("eval/"))): r for r in evals}
    for key, (step, mode) in {"start": (0, "policy"), "end": (2, "policy"), "always_search": (0, "always_search"),
                              "never_search": (0, "never_search")}.items():
        for metric in ("accuracy", "search_ratio", "accuracy_search_free", "search_ratio_search_free",
                       "accuracy_search_required", "search_ratio_search_required"):
            assert report[key][metric] == pytest.approx(by[(step, mode)][f"eval/{mode}/{metric}"]), (key, metric)
    assert report["always_search"]["search_ratio"] == 1.0 and report["never_search"]["search_ratio"] == 0.0
    assert report["settings"]["run"]["max_steps"] == 2 and report["seed"] == 0 and len(report["targets"]) == 4
    assert (run.out / "report.md").read_text().startswith("# Search on demand")
    assert (run.out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out report (" in run.output and "| policy, step 2 (end) |" in run.output
    warm = [json.loads(line) for line in (run.out / "warm_start.jsonl").read_text().splitlines()]
    path = next(r["search_path"] for r in warm if "search_path" in r)
    assert path["image_top1"] >= 0.9 and path["text_hit"] >= 0.9 and path["accuracy_text_search"] >= 0.9, path
    assert any("heldout_workflow" in r for r in warm) and "search path (oracle through the tool servers" in run.output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/policy/accuracy")] == [0, 2]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)  # may be the test that starts the scaled launch
def test_plots_command_writes_a_png_per_metric_family(scaled_run, tmp_path):
    assert scaled_run.proc.returncode == 0
    done = subprocess.run([sys.executable, "-m", "launcher.plots", str(scaled_run.out), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == sorted(f"{n}.png" for n in ("reward", "accuracy", "search_ratio", "staleness", "throughput",
                                                 "tool_latency", "learner_idle"))
    for path in tmp_path.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_eval_mode_scores_a_checkpoint_on_an_fvqa_style_parquet(scaled_run, tmp_path):
    assert scaled_run.proc.returncode == 0
    world = pq.read_table(_world_questions()).to_pylist()
    picked = [r for r in world if r["split"] == "test"][:6]
    fvqa = [{"data_id": f"fvqa-{i}", "prompt": [{"role": "user", "content": f"<image>{r['question']}"}],
             "images": [{"bytes": r["image"], "path": None}],
             "reward_model": {"ground_truth": [r["answer"], *r["aliases"]], "style": "rule"},
             "search_required": r["search_label"] == "search_required"} for i, r in enumerate(picked)]
    data = tmp_path / "fvqa_test.parquet"
    pq.write_table(pa.Table.from_pylist(fvqa), data)

    run = LaunchWatch(tmp_path / "eval", "run.mode=eval", f"run.eval.checkpoint={scaled_run.out / 'checkpoints'}",
                      f"data.path={data}", "data.dataset=fvqa")
    run.wait()
    print(f"eval launch: {run.seconds:.0f}s")
    assert run.proc.returncode == 0, run.output[-6000:]
    assert "| all | 6 |" in run.output  # the summary table, printed
    out = run.out / "eval"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in samples) == sorted(r["data_id"] for r in fvqa)
    assert {s["search_label"] for s in samples} <= {"search_required", "search_free"}
    assert (out / "summary.md").read_text().startswith("| group |")
    exported = json.loads((out / "model" / "forage_checkpoint.json").read_text())
    assert exported["checkpoint"].endswith("step_00000002")  # the newest checkpoint of the training run
    assert pq.read_table(run.out / "data" / "questions.parquet").num_rows == 6
    run.assert_nothing_left()


# ---------------------------------------------------------------------------------------------- 3: sync + Ctrl-C

@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sync_mode_trains_fresh_groups_and_ctrl_c_checkpoints_and_stops_everything(tmp_path):
    run = LaunchWatch(tmp_path / "run", "run.mode=sync", "run.max_steps=1000", "algo.group_size=4", NO_REPORT)
    run.wait(until=lambda: len(run.rows()) >= 2)
    assert run.proc.poll() is None, run.output[-6000:]
    run.proc.send_signal(signal.SIGINT)
    run.wait()
    print(f"sync launch: {run.seconds:.0f}s")
    assert run.proc.returncode == 130, run.output[-6000:]
    assert "interrupted: stopping every role" in run.output
    rows = run.rows()
    assert len(rows) >= 2
    for row in rows:  # max_staleness=0 and actors wait for each version: every token is on-policy
        assert row["staleness_max"] == 0 and row["stale_groups_dropped"] == 0, row
    checkpoints = sorted((run.out / "checkpoints").glob("step_*"))
    assert checkpoints and int(checkpoints[-1].name.split("_")[1]) >= len(rows), checkpoints
    state = json.loads((checkpoints[-1] / "learner_state.json").read_text())
    assert state["version"] >= len(rows)
    # the actor finished and delivered what it had admitted before stopping: nothing is left in its spool
    spools = run.out / "actors"
    assert not list(spools.rglob("spool/groups/*")) and not list(spools.rglob("spool/grants/*"))
    assert (run.out / "summary.json").exists()
    run.assert_nothing_left()


# ---------------------------------------------------------------------------------------------- 6: algo=sft

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> LaunchWatch:
    run = LaunchWatch(tmp_path_factory.mktemp("sft") / "run", "algo=sft", "algo.steps=24", "algo.vision_steps=8",
                      "learner.world_size=2")
    run.wait()
    print(f"sft launch: {run.seconds:.0f}s")
    return run


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sft_alone_trains_on_the_learner_ranks_and_writes_a_model(sft_run):
    run = sft_run
    assert run.proc.returncode == 0, run.output[-6000:]
    rows = run.rows()
    assert [r["step"] for r in rows] == list(range(1, 25)), run.output[-3000:]
    assert [r["vision_phase"] for r in rows] == [1.0] * 8 + [0.0] * 16
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-4:]) / 4
    assert last < first - 1.0, (first, last)
    model = run.out / "model"
    base = Path(json.loads((run.out / "model.json").read_text())["model_path"])  # what it trained from
    assert base.name.startswith("tiny-") and "-warm-" not in base.name
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    assert json.loads((model / "forage_build.json").read_text())["report"]["steps"] == 24
    assert f"model.path={model}" in run.output
    roles = json.loads((run.out / "roles.json").read_text())
    assert not roles["actors"] and not roles["tool_servers"]
    run.assert_nothing_left()


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_during_the_warm_start_stops_the_ranks_and_saves_nothing(tmp_path):
    run = LaunchWatch(tmp_path / "run", "algo=sft", "algo.steps=5000", "algo.vision_steps=10")
    run.wait(until=lambda: len(run.rows()) >= 3)
    assert run.proc.poll() is None, run.output[-6000:]
    run.proc.send_signal(signal.SIGINT)
    run.wait()
    print(f"sft + Ctrl-C launch: {run.seconds:.0f}s")
    assert run.proc.returncode == 130, run.output[-6000:]
    assert "stopping the warm start (nothing is saved)" in run.output
    assert 3 <= len(run.rows()) < 5000
    assert not (run.out / "model").exists() and not list(run.out.glob(".tmp-model-*"))
    run.assert_nothing_left()


# ---------------------------------------------------------------------------------------------- 4: curate

@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_curate_mode_labels_an_image_folder_and_writes_a_balanced_subset(sft_run, tmp_path):
    """Also: vLLM serves the folder algo=sft wrote (model.path)."""
    assert sft_run.proc.returncode == 0
    folder = tmp_path / "images"
    folder.mkdir()
    world = pq.read_table(_world_questions()).to_pylist()
    picked = [r for r in world if r["kind"] == "pixels"][:3] + [r for r in world if r["kind"] == "image_search"][:3]
    with open(folder / "metadata.jsonl", "w") as meta:
        for i, r in enumerate(picked):
            (folder / f"q{i}.png").write_bytes(r["image"])
            meta.write(json.dumps({"file_name": f"q{i}.png", "question": r["question"], "answer": r["answer"],
                                   "aliases": r["aliases"], "search_label": r["search_label"]}) + "\n")

    run = LaunchWatch(tmp_path / "curate", "run.mode=curate", "run.curate.k=2", f"data.path={folder}",
                      "data.dataset=folder", f"model.path={sft_run.out / 'model'}")
    run.wait()
    print(f"curate launch: {run.seconds:.0f}s")
    assert run.proc.returncode == 0, run.output[-6000:]
    out = run.out / "curate"
    labels = pq.read_table(out / "labels.parquet").to_pylist()
    assert len(labels) == 6 and all(r["runs"] == 2 for r in labels)
    assert {r["curated_label"] for r in labels} <= {"search_free", "search_required", "unsolved"}
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["labels"].values()) == 6 and "| balanced subset |" in run.output
    balanced = pq.read_table(out / "balanced.parquet").to_pylist()
    assert len(balanced) == summary["balanced"]
    if balanced:
        from actors.questions import load_questions

        assert len(load_questions(out / "balanced.parquet", None)) == len(balanced)
        free = sum(r["search_label"] == "search_free" for r in balanced)
        assert free == len(balanced) - free  # 1:1
    run.assert_nothing_left()


# ---------------------------------------------------------------------------------------------- 5: two nodes

@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_node_cluster_places_the_learner_and_actors_on_different_nodes(tmp_path):
    from ray_nodes import LoopbackRayCluster

    cluster = LoopbackRayCluster(tmp_path / "cluster", {"learner_node": 2}, {"actor_node": 2})
    try:
        run = LaunchWatch(tmp_path / "run", f"run.ray_address={cluster.address}", "run.max_steps=2",
                          "algo.group_size=4", "run.placement.learner.resources={learner_node:1}",
                          "run.placement.actors.resources={actor_node:1}", QUICK_STOP, NO_REPORT,
                          env={"RAY_AUTH_TOKEN": cluster.token, "RAY_AUTH_MODE": "token"}, also=cluster.family)
        run.wait()
        print(f"two-node launch: {run.seconds:.0f}s")
        assert run.proc.returncode == 0, run.output[-6000:]
        assert [r["step"] for r in run.rows()] == [1, 2]
        roles = json.loads((run.out / "roles.json").read_text())
        learner_nodes = {r["node_id"] for r in roles["learner"]}
        actor_nodes = {a["node_id"] for a in roles["actors"]}
        assert len(learner_nodes) == 1 and len(actor_nodes) == 1 and learner_nodes != actor_nodes, roles
        assert cluster.alive(), "launch.py must leave a cluster it joined running"
        time.sleep(3)
        assert not _role_processes(cluster.family()), "a role of the finished run is still alive"
        assert not run.wide, f"listeners beyond loopback: {run.wide}"
    finally:
        cluster.stop()
    time.sleep(2)
    assert not _alive(cluster.seen), "ray node processes left behind"
    run.assert_nothing_left(keep=set())
