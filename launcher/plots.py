"""PNG plots of a run folder's metrics.jsonl (and its eval summary, when there is one).

    python -m launcher.plots RUN_DIR [--out DIR]        # default DIR = RUN_DIR/plots

One figure per question: reward, accuracy, search ratio (overall and per search label), staleness, rollout
throughput (tokens/s, groups/s), tool latency percentiles (server and client side), learner idle fraction; plus
eval_by_group.png from RUN_DIR/eval/summary.json. A figure whose metrics the run did not record is skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

Row = dict[str, Any]


class PlotError(ValueError):
    """The run folder has nothing to plot; the message names the file."""


def read_rows(run_dir: Path) -> list[Row]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path} does not exist: is {run_dir} a run folder?")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise PlotError(f"{path}:{number}: not JSON ({exc})") from exc
    if not rows:
        raise PlotError(f"{path} has no rows yet")
    return rows


def series(rows: Sequence[Row], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry `key`."""
    points = [(float(r["step"]), float(r[key])) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def keys_like(rows: Sequence[Row], prefix: str, suffix: str = "") -> list[str]:
    return sorted({k for r in rows for k in r if k.startswith(prefix) and k.endswith(suffix)})


# ---------------------------------------------------------------------------------------------- figures

def _lines(ax: Any, rows: Sequence[Row], keys: Sequence[str], labels: Sequence[str] | None = None,
           style: str = "-o") -> int:
    drawn = 0
    for i, key in enumerate(keys):
        x, y = series(rows, key)
        if x:
            ax.plot(x, y, style, markersize=3, label=labels[i] if labels else key)
            drawn += 1
    return drawn


def plot_reward(ax: Any, rows: Sequence[Row]) -> int:
    ax.set_ylabel("reward (mean per trajectory)")
    return _lines(ax, rows, ["reward_mean"], ["reward"])


def plot_accuracy(ax: Any, rows: Sequence[Row]) -> int:
    ax.set_ylabel("accuracy")
    keys = ["accuracy"] + [k for k in keys_like(rows, "accuracy_") if k != "accuracy"]
    return _lines(ax, rows, keys)


def plot_search_ratio(ax: Any, rows: Sequence[Row]) -> int:
    ax.set_ylabel("share of trajectories that searched")
    keys = ["search_ratio"] + keys_like(rows, "search_ratio_")
    labels = ["all"] + [k[len("search_ratio_"):] for k in keys[1:]]
    return _lines(ax, rows, keys, labels)


def plot_staleness(ax: Any, rows: Sequence[Row]) -> int:
    ax.set_ylabel("policy versions behind (generated tokens)")
    return _lines(ax, rows, ["staleness_mean", "staleness_max"], ["mean", "max"])


def plot_tokens_per_s(ax: Any, rows: Sequence[Row]) -> int:
    ax.set_ylabel("rollout tokens / s")
    return _lines(ax, rows, ["rollout_tokens_per_s"], ["tokens/s"])


def plot_groups_per_s(ax: Any, rows: Sequence[Row]) -> int:
    ax.set_ylabel("rollout groups / s")
    return _lines(ax, rows, ["rollout_groups_per_s"], ["groups/s"])


def plot_tool_latency(ax: Any, rows: Sequence[Row]) -> int:
    ax.set_ylabel("tool latency (ms)")
    server = keys_like(rows, "tool_", "_latency_ms_p50") + keys_like(rows, "tool_", "_latency_ms_p90") + \
        keys_like(rows, "tool_", "_latency_ms_p99")
    server = [k for k in server if not k.startswith("tool_client_")]
    client = [k for k in keys_like(rows, "tool_client_") if "_latency_ms_p" in k]
    drawn = _lines(ax, rows, server, [k[len("tool_"):].replace("_latency_ms_", " server ") for k in server])
    drawn += _lines(ax, rows, client, [k[len("tool_client_"):].replace("_latency_ms_", " client ") for k in client],
                    style="--x")
    if drawn:
        ax.set_yscale("log")
    return drawn


def plot_learner_idle(ax: Any, rows: Sequence[Row]) -> int:
    ax.set_ylabel("learner idle fraction (waiting for groups)")
    ax.set_ylim(0, 1)
    causes = [k for k in keys_like(rows, "learner_idle_", "_frac") if k != "learner_idle_frac"]
    return _lines(ax, rows, ["learner_idle_frac"] + causes,
                  ["idle"] + [k[len("learner_idle_"):-len("_frac")].replace("_", " ") for k in causes])


FIGURES: dict[str, tuple[str, Sequence[Callable[[Any, Sequence[Row]], int]]]] = {
    "reward": ("Reward", [plot_reward]),
    "accuracy": ("Accuracy", [plot_accuracy]),
    "search_ratio": ("Search ratio by search label", [plot_search_ratio]),
    "staleness": ("Staleness over time", [plot_staleness]),
    "throughput": ("Rollout throughput", [plot_tokens_per_s, plot_groups_per_s]),
    "tool_latency": ("Tool latency percentiles", [plot_tool_latency]),
    "learner_idle": ("Learner idle fraction", [plot_learner_idle]),
}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write every figure the run's metrics support into `out_dir` (default RUN_DIR/plots); returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / "plots"
    rows = read_rows(run)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, panels) in FIGURES.items():
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.2 * len(panels)), squeeze=False)
        drawn = 0
        for ax, panel in zip(axes[:, 0], panels):
            count = panel(ax, rows)
            drawn += count
            if count:
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        axes[-1, 0].set_xlabel("learner step")
        for ax in axes[:, 0]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(f"{title} — {run.name}")
        fig.tight_layout()
        if drawn:
            path = out / f"{name}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        else:
            log.info("no metrics for %s in %s; skipped", name, run)
        plt.close(fig)
    eval_plot = plot_eval(run / "eval" / "summary.json", out, plt)
    if eval_plot is not None:
        written.append(eval_plot)
    return written


def plot_eval(summary_path: Path, out: Path, plt: Any) -> Path | None:
    """Bar chart of accuracy and search ratio per group of an eval summary (actors/eval.py's table)."""
    if not summary_path.is_file():
        return None
    table = json.loads(summary_path.read_text()).get("table") or []
    if not table:
        return None
    names = [row["group"] for row in table]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 3.5))
    positions = range(len(names))
    ax.bar([p - 0.2 for p in positions], [row["accuracy"] for row in table], width=0.4, label="accuracy")
    ax.bar([p + 0.2 for p in positions], [row["searched"] for row in table], width=0.4, label="searched")
    ax.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Eval by group")
    fig.tight_layout()
    path = out / "eval_by_group.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.plots", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        written = plot_run(args.run_dir, args.out)
    except PlotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
