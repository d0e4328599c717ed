"""Async vs sync on the search workload: the same run in run.mode=sync and run.mode=async, through the real stack.

    PYTHONPATH=. .venv/bin/python bench/async_vs_sync.py                   # 2 seeds x (1, 2 actors) x (sync, η 1 2 4)
    PYTHONPATH=. .venv/bin/python bench/async_vs_sync.py --quick           # a smoke: 1 seed, 1 actor, sync + η 1
    PYTHONPATH=. .venv/bin/python bench/async_vs_sync.py --steps 40 --seeds 0 1 --eta 1 2 --actors 1 --sigma 0.5
    PYTHONPATH=. .venv/bin/python bench/async_vs_sync.py --figures runs/a runs/b  # figures of finished runs only

Every run is `python launch.py run.mode=... run.max_steps=STEPS ...` in a subprocess (vLLM actors, tool server
processes, the FSDP2 learner), with the tool servers' latency model on (tool_servers/latency.py: a seeded log-normal
delay per reply, median 1.0 s for image search and 0.5 s for text search, σ = --sigma, many requests waiting at
once), each into its own folder under --out. The figures come from each run's metrics.jsonl, over the learner steps
after the first --warmup (start-up lands in the first steps' waits). Per run: trajectories/s and tokens/s (over the
learner's own step cycles: waiting for groups + training + publishing), learner idle fraction (and its split by cause:
the admission rule's bound, an actor sleeping out a denial's retry delay, the actors' own limit, no rollouts
at all; learner/admission.py), staleness mean
(token-weighted) and max, seconds per step split into rollout wait (`learner_idle_s`), train (`step_time_s`) and
publish (`publish_s`), final reward (mean over the last 5 steps) and held-out accuracy (the last
`eval/policy/accuracy`, with --heldout). Per (seed, actors) and η: the async/sync ratio of trajectories/s, the
overlap bound from the sync run's phase times, (rollout + train + publish) / (max(rollout, train) + publish), and
the share of the bound reached (ratio / bound). Writes OUT/async_vs_sync.json and prints `async/sync: X.XX×` and
`learner idle: Y.Y%` for the first --eta and --actors, averaged over the seeds. Not a unit test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launcher.run_folder import rl_rows  # noqa: E402  (the learner's RL rows of a metrics.jsonl)
from learner.admission import IDLE_CAUSES  # noqa: E402  (why the learner waited)

TARGET = 2.8  # issue 13: async/sync >= 2.8x at η <= 2
FINAL_REWARD_STEPS = 5  # "final reward" = the mean reward of the last this many steps


# ------------------------------------------------------------------------------------------ the arithmetic (pure)

def overlap_bound(rollout_s: float, train_s: float, publish_s: float) -> float:
    """How much faster a step can get when rollout and training overlap perfectly and publishing does not:
    (rollout + train + publish) / (max(rollout, train) + publish); 1.0 for an empty step."""
    overlapped = max(rollout_s, train_s) + publish_s
    return (rollout_s + train_s + publish_s) / overlapped if overlapped > 0 else 1.0


def run_figures(rows: Sequence[Mapping[str, Any]], warmup: int) -> dict[str, float]:
    """A run's figures from its metrics rows, over the training steps after the first `warmup` ones.

    Times per step are means of the learner's own timings; rates divide by the sum of its step cycles
    (learner_idle_s + step_time_s + publish_s), which leaves out start-up and everything between runs' steps."""
    train_rows = rl_rows(rows)
    measured = train_rows[warmup:]
    if not measured:
        raise ValueError(f"no training step after the first {warmup} (of {len(train_rows)}): nothing to measure")
    n = len(measured)

    def total(key: str) -> float:
        return sum(float(row.get(key, 0.0)) for row in measured)

    rollout, train, publish = total("learner_idle_s"), total("step_time_s"), total("publish_s")
    cycle = rollout + train + publish
    tokens = total("tokens_generated")
    figures = {
        "steps": float(n),
        "trajectories_per_s": total("trajectories") / cycle if cycle > 0 else 0.0,
        "tokens_per_s": tokens / cycle if cycle > 0 else 0.0,
        "learner_idle_frac": rollout / cycle if cycle > 0 else 0.0,
        **{f"idle_{cause}_frac": total(f"learner_idle_{cause}_s") / cycle if cycle > 0 else 0.0
           for cause in IDLE_CAUSES},
        "staleness_mean": (sum(float(r.get("staleness_mean", 0.0)) * float(r.get("tokens_generated", 0.0))
                               for r in measured) / tokens) if tokens > 0 else 0.0,
        "staleness_max": max(float(r.get("staleness_max", 0.0)) for r in measured),
        "rollout_wait_s": rollout / n,
        "train_s": train / n,
        "publish_s": publish / n,
        "step_cycle_s": cycle / n,
        "final_reward": sum(float(r.get("reward_mean", 0.0)) for r in train_rows[-FINAL_REWARD_STEPS:])
        / len(train_rows[-FINAL_REWARD_STEPS:]),
    }
    walls = [float(r["wall_time_s"]) for r in train_rows if "wall_time_s" in r]
    if len(walls) == len(train_rows) and warmup > 0:  # the wall clock between the rows, for comparison
        span = walls[-1] - walls[warmup - 1]
        figures["wall_trajectories_per_s"] = total("trajectories") / span if span > 0 else 0.0
    heldout = [r["eval/policy/accuracy"] for r in rows if "eval/policy/accuracy" in r]
    if heldout:
        figures["heldout_accuracy"] = float(heldout[-1])
    return figures


def compare(sync: Mapping[str, float], asynchronous: Mapping[str, float]) -> dict[str, float]:
    """async/sync ratio of trajectories/s, the overlap bound of the sync run's phases, and the share reached."""
    ratio = asynchronous["trajectories_per_s"] / sync["trajectories_per_s"] if sync["trajectories_per_s"] > 0 else 0.0
    bound = overlap_bound(sync["rollout_wait_s"], sync["train_s"], sync["publish_s"])
    return {"ratio": ratio, "bound": bound, "share_of_bound": ratio / bound}


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------------------------------ running launch.py

def run_name(mode: str, eta: int, actors: int, seed: int) -> str:
    return f"{mode}-a{actors}-s{seed}" if mode == "sync" else f"async-eta{eta}-a{actors}-s{seed}"


def launch_overrides(mode: str, eta: int, actors: int, seed: int, args: argparse.Namespace, out_dir: Path) -> list[str]:
    """The Hydra overrides of one run: the default workload with the latency model on, no report unless asked."""
    overrides = [
        f"run.mode={mode}", f"run.max_steps={args.steps}", f"run.seed={seed}", f"run.out_dir={out_dir}",
        f"run.timeout_s={args.run_timeout_s}", "run.progress=false", f"actors.num_actors={actors}",
    ]
    if mode == "async":
        overrides.append(f"algo.max_staleness={eta}")
    for section in ("image", "text"):
        overrides += [f"tool_servers.{section}.latency.enabled=true", f"tool_servers.{section}.latency.sigma={args.sigma}",
                      f"tool_servers.{section}.latency.seed={seed}"]
    if args.heldout:  # held-out passes at step 0 and the end only, on actor 0's engine
        overrides += ["run.report.enabled=true", "run.report.every=0", "run.report.baselines=false",
                      f"run.report.per_label={args.heldout}"]
    else:
        overrides.append("run.report.enabled=false")
    return overrides + list(args.override)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_once(name: str, overrides: list[str], out_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One launch.py run (reused when --reuse and its folder already holds every step); its metrics rows."""
    metrics = out_dir / "metrics.jsonl"
    if out_dir.exists():
        if args.reuse and len(rl_rows(read_rows(metrics))) >= args.steps:
            print(f"[{name}] reusing {out_dir}", flush=True)
            return read_rows(metrics)
        raise SystemExit(f"{out_dir} exists (pass --reuse to reuse finished runs, or another --out)")
    out_dir.mkdir(parents=True)
    command = [sys.executable, "launch.py", *overrides]
    print(f"[{name}] {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    with open(out_dir.parent / f"{name}.console.log", "w") as console:
        process = subprocess.Popen(command, cwd=ROOT, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=args.run_timeout_s + 300)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # launch.py stops every process it started
            try:
                code = process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                code = process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
            raise
    rows = read_rows(metrics)
    steps = len(rl_rows(rows))
    print(f"[{name}] exit {code} after {time.monotonic() - started:.0f}s, {steps} step(s)", flush=True)
    if code != 0 or steps < args.steps:
        raise SystemExit(f"[{name}] failed (exit {code}, {steps}/{args.steps} steps): see {out_dir}/logs and "
                         f"{out_dir.parent / (name + '.console.log')}")
    return rows


# ------------------------------------------------------------------------------------------ printing

def idle_split(f: Mapping[str, float]) -> str:
    """The idle fraction by cause (learner/admission.py IDLE_CAUSES), e.g. `bound 3.1% retry 0.0% actors 20.4% none 0.2%`."""
    short = {"staleness_bound": "bound", "admission_retry": "retry", "actor_limit": "actors", "no_rollouts": "none"}
    return " ".join(f"{short[c]} {100 * f.get(f'idle_{c}_frac', 0.0):.1f}%" for c in IDLE_CAUSES)


def format_run(mode: str, eta: Optional[int], f: Mapping[str, float]) -> str:
    heldout = f"{f['heldout_accuracy']:.3f}" if "heldout_accuracy" in f else "-"
    return (f"  {mode:<5} η={'-' if eta is None else eta:<2} {f['trajectories_per_s']:7.2f} traj/s "
            f"{f['tokens_per_s']:8.1f} tok/s  idle {100 * f['learner_idle_frac']:5.1f}% ({idle_split(f)})  "
            f"staleness {f['staleness_mean']:.2f}/{f['staleness_max']:.0f}  per step: rollout wait "
            f"{f['rollout_wait_s']:.2f}s train {f['train_s']:.2f}s publish {f['publish_s']:.2f}s  "
            f"reward {f['final_reward']:.3f}  held-out {heldout}")


def summarize(results: Mapping[str, Any], etas: Sequence[int], actors: Sequence[int],
              seeds: Sequence[int]) -> dict[str, Any]:
    """Per (actors, η): the means over seeds of ratio, bound, share and async idle; the headline is the first
    actors count and η."""
    table = {}
    for a in actors:
        for eta in etas:
            cells = [results["comparisons"][f"a{a}-s{s}-eta{eta}"] for s in seeds]
            idles = [results["runs"][run_name("async", eta, a, s)]["learner_idle_frac"] for s in seeds]
            table[f"a{a}-eta{eta}"] = {
                "actors": a, "eta": eta, "ratio": mean([c["ratio"] for c in cells]),
                "ratio_per_seed": [c["ratio"] for c in cells], "bound": mean([c["bound"] for c in cells]),
                "share_of_bound": mean([c["share_of_bound"] for c in cells]), "async_learner_idle_frac": mean(idles),
            }
    return {"by_config": table, "headline": table[f"a{actors[0]}-eta{etas[0]}"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="learner steps per run (sync and async alike)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures (start-up)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eta", type=int, nargs="+", default=[1, 2, 4], help="algo.max_staleness of the async runs")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actors.num_actors (both modes)")
    parser.add_argument("--sigma", type=float, default=0.5, help="σ of the tools' log-normal latency")
    parser.add_argument("--heldout", type=int, default=0,
                        help="held-out questions per search label at step 0 and the end (0: no held-out pass)")
    parser.add_argument("--out", default=None, help="folder for the runs and async_vs_sync.json "
                                                   "(default runs/bench/async_vs_sync-<time>)")
    parser.add_argument("--run-timeout-s", type=int, default=3600, help="one run's run.timeout_s")
    parser.add_argument("--reuse", action="store_true", help="reuse runs under --out that finished every step")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra Hydra override for every run (repeatable)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke: 4 steps (1 warm-up), seed 0, 1 actor, η 1, no held-out pass")
    parser.add_argument("--figures", nargs="+", metavar="RUN_DIR", default=None,
                        help="launch nothing: print the per-run figures (idle split included) of finished runs' "
                             "folders, e.g. a default `python launch.py` run, over the steps after --warmup")
    args = parser.parse_args(argv)
    if args.figures:
        for folder in args.figures:
            rows = read_rows(Path(folder) / "metrics.jsonl")
            if not rows:
                raise SystemExit(f"{folder}: no metrics.jsonl rows")
            print(f"{folder}:\n{format_run('run', None, run_figures(rows, args.warmup))}")
        return 0
    if args.quick:
        args.steps, args.warmup, args.seeds, args.eta, args.actors, args.heldout = 4, 1, [0], [1], [1], 0
        args.run_timeout_s = min(args.run_timeout_s, 900)
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    out = Path(args.out or ROOT / "runs" / "bench" / time.strftime("async_vs_sync-%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    print(f"async vs sync -> {out}: steps {args.steps} (warm-up {args.warmup}), seeds {args.seeds}, η {args.eta}, "
          f"actors {args.actors}, σ {args.sigma}; load average {load_before[0]:.1f}", flush=True)

    results: dict[str, Any] = {"runs": {}, "comparisons": {}}
    for seed in args.seeds:
        for actors in args.actors:
            todo = [("sync", 0)] + [("async", eta) for eta in args.eta]
            for mode, eta in todo:
                name = run_name(mode, eta, actors, seed)
                rows = run_once(name, launch_overrides(mode, eta, actors, seed, args, out / name), out / name, args)
                results["runs"][name] = run_figures(rows, args.warmup)
            sync = results["runs"][run_name("sync", 0, actors, seed)]
            print(f"seed {seed}, {actors} actor(s):")
            print(format_run("sync", None, sync))
            for eta in args.eta:
                figures = results["runs"][run_name("async", eta, actors, seed)]
                cell = results["comparisons"][f"a{actors}-s{seed}-eta{eta}"] = compare(sync, figures)
                print(format_run("async", eta, figures))
                print(f"    async/sync {cell['ratio']:.2f}×, overlap bound {cell['bound']:.2f}× "
                      f"(sync phases), {100 * cell['share_of_bound']:.0f}% of the bound")
            sys.stdout.flush()

    summary = summarize(results, args.eta, args.actors, args.seeds)
    head = summary["headline"]
    load_after = os.getloadavg()
    results.update(summary)
    results["setup"] = {
        "steps": args.steps, "warmup": args.warmup, "seeds": args.seeds, "eta": args.eta, "actors": args.actors,
        "sigma": args.sigma, "heldout": args.heldout, "overrides": args.override, "quick": args.quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_average_before": load_before[0], "load_average_after": load_after[0],
        "finished": time.strftime("%Y-%m-%d %H:%M"),
    }
    (out / "async_vs_sync.json").write_text(json.dumps(results, indent=2) + "\n")
    for key, cell in summary["by_config"].items():
        print(f"{cell['actors']} actor(s), η={cell['eta']}: async/sync {cell['ratio']:.2f}× "
              f"(seeds {', '.join(f'{r:.2f}' for r in cell['ratio_per_seed'])}), bound {cell['bound']:.2f}×, "
              f"{100 * cell['share_of_bound']:.0f}% of the bound, async learner idle "
              f"{100 * cell['async_learner_idle_frac']:.1f}%")
    seeds = f"seed{'s' if len(args.seeds) > 1 else ''} {', '.join(map(str, args.seeds))}"
    print(f"async/sync: {head['ratio']:.2f}× (η={head['eta']}, {head['actors']} actor(s), {seeds}; "
          f"overlap bound {head['bound']:.2f}×, target {TARGET}×)")
    print(f"learner idle: {100 * head['async_learner_idle_frac']:.1f}% (async, η={head['eta']}, "
          f"{head['actors']} actor(s))")
    if head["bound"] < TARGET:
        print(f"the overlap bound of this workload, {head['bound']:.2f}×, is below the {TARGET}× target: overlapping "
              f"rollout and training alone cannot reach it (knobs that change the phases: --actors, "
              f"--override actors.max_concurrency=N, --override actors.max_groups_in_flight=N)")
    print(f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after; figures: {out / 'async_vs_sync.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
