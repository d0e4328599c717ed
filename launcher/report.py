"""The end-of-run report of search on demand: the policy at its first and last in-run evaluation against two fixed
baselines of the warm-started model on the same held-out questions, per search label.

    always_search  the RAG workflow: image search, then text search, then the answer, on every question
    never_search   the answer without any search

Each evaluation pass is summarised (`summarize`) into accuracy and search ratio (share of episodes with at least one
search, as in MMSearch-R1), overall and per label. `build_report` picks `start` (the policy's first pass), `end` (its
last) and the baselines, and checks the targets of the default run; `write_report` writes <run>/report.json,
report.md and report.png (accuracy and search ratio per label against the learner step, baselines as horizontal
lines); `format_report` is the console table.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

LABELS = ("search_free", "search_required")
POLICY, ALWAYS, NEVER = "policy", "always_search", "never_search"
BASELINES = (ALWAYS, NEVER)
METRICS = ("accuracy", "search_ratio")
# Targets of the default run (issue 11): searches on search-free questions fall away, search-required accuracy
# keeps up with the RAG workflow, and accuracy beats both answering alone and where RL started.
FREE_SEARCH_RATIO_MAX = 0.10
REQUIRED_ACCURACY_SHARE = 0.9


@dataclass(frozen=True)
class EvalPass:
    """One greedy evaluation of one mode over the held-out questions, at learner step `step` (policy `version`)."""

    mode: str  # policy | always_search | never_search
    step: int
    version: int
    summary: Mapping[str, float]  # `summarize` of its samples
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """The pass as metrics-row keys: eval/<mode>/<key>."""
        return {f"eval/{self.mode}/{key}": float(value) for key, value in self.summary.items()}


def answered_accuracy(samples: Iterable[Mapping[str, Any]]) -> Optional[float]:
    """The share of `correct` among the samples no tool outage cut (`tool_failed`: not the model's error); None when
    every one was cut."""
    answered = [bool(s["correct"]) for s in samples if not s.get("tool_failed")]
    return sum(answered) / len(answered) if answered else None


def summarize(samples: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Accuracy and search ratio, overall and per search label, of eval samples (each with `correct`, `searches`
    and `search_label`); `n` and `n_<label>` count them. A label with no sample is left out. Samples a tool outage
    cut (`tool_failed`, actors/eval.py) are counted (`tool_failed`, `tool_failed_<label>`) and left out of the
    accuracy, which is the model's; the search ratio keeps them (searching was the policy's decision)."""
    rows = list(samples)
    if not rows:
        raise ValueError("no eval samples to summarise")
    out: dict[str, float] = {}
    groups: list[tuple[str, list[Mapping[str, Any]]]] = [("", rows)]
    groups += [(f"_{label}", [r for r in rows if r.get("search_label") == label]) for label in LABELS]
    for suffix, members in groups:
        if not members:
            continue
        out[f"n{suffix}"] = float(len(members))
        failed = sum(bool(r.get("tool_failed")) for r in members)
        if failed:
            out[f"tool_failed{suffix}"] = float(failed)
        accuracy = answered_accuracy(members)
        if accuracy is not None:
            out[f"accuracy{suffix}"] = accuracy
        out[f"search_ratio{suffix}"] = sum(int(r["searches"]) > 0 for r in members) / len(members)
    return out


@dataclass
class Report:
    start: Mapping[str, float]
    end: Mapping[str, float]
    always_search: Mapping[str, float]
    never_search: Mapping[str, float]
    start_step: int
    end_step: int
    targets: dict[str, bool] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def met(self) -> bool:
        return all(self.targets.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def _pick(passes: Sequence[EvalPass], mode: str, last: bool) -> EvalPass:
    chosen = [p for p in passes if p.mode == mode]
    if not chosen:
        raise ValueError(f"no {mode} evaluation among {sorted({p.mode for p in passes})}")
    return max(chosen, key=lambda p: p.step) if last else min(chosen, key=lambda p: p.step)


def check_targets(start: Mapping[str, float], end: Mapping[str, float], always: Mapping[str, float],
                  never: Mapping[str, float]) -> dict[str, bool]:
    """Each target of the default run and whether the end of the run meets it (a missing label fails it)."""
    nan = float("nan")
    return {
        f"search_ratio_search_free < {FREE_SEARCH_RATIO_MAX:g}":
            end.get("search_ratio_search_free", nan) < FREE_SEARCH_RATIO_MAX,
        f"accuracy_search_required >= {REQUIRED_ACCURACY_SHARE:g} x always_search":
            end.get("accuracy_search_required", nan)
            >= REQUIRED_ACCURACY_SHARE * always.get("accuracy_search_required", nan),
        "accuracy > never_search": end.get("accuracy", nan) > never.get("accuracy", nan),
        "accuracy > start": end.get("accuracy", nan) > start.get("accuracy", nan),
    }


def build_report(passes: Sequence[EvalPass], settings: Mapping[str, Any] | None = None, seed: int = 0) -> Report:
    """The report of a run's eval passes: the policy's first and last pass and each baseline's (latest) pass."""
    start, end = _pick(passes, POLICY, last=False), _pick(passes, POLICY, last=True)
    always, never = _pick(passes, ALWAYS, last=True), _pick(passes, NEVER, last=True)
    return Report(start=dict(start.summary), end=dict(end.summary), always_search=dict(always.summary),
                  never_search=dict(never.summary), start_step=start.step, end_step=end.step,
                  targets=check_targets(start.summary, end.summary, always.summary, never.summary),
                  settings=dict(settings or {}), seed=seed)


# ---------------------------------------------------------------------------------------------- output

COLUMNS = [("accuracy", "acc"), ("accuracy_search_free", "acc free"), ("accuracy_search_required", "acc required"),
           ("search_ratio", "SR"), ("search_ratio_search_free", "SR free"),
           ("search_ratio_search_required", "SR required")]


def format_report(report: Report) -> str:
    """The report as a markdown table (one row per policy/baseline) followed by the targets."""
    rows = [(f"policy, step {report.start_step} (start)", report.start),
            (f"policy, step {report.end_step} (end)", report.end),
            ("always search (warm start, RAG workflow)", report.always_search),
            ("never search (warm start)", report.never_search)]
    lines = ["| | " + " | ".join(title for _, title in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, summary in rows:
        cells = [f"{summary[key]:.3f}" if key in summary else "-" for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- [{'x' if ok else ' '}] {target}" for target, ok in report.targets.items()]
    return "\n".join(lines)


def write_report(run_dir: Path, report: Report, passes: Sequence[EvalPass]) -> list[Path]:
    """<run>/report.json, report.md and report.png; returns the files written."""
    run_dir = Path(run_dir)
    written = [run_dir / "report.json", run_dir / "report.md"]
    history = [{"mode": p.mode, "step": p.step, "version": p.version, "seconds": p.seconds, **p.summary}
               for p in passes]
    written[0].write_text(json.dumps({**report.to_json(), "evals": history}, indent=2, sort_keys=True) + "\n")
    written[1].write_text("# Search on demand: held-out evaluation\n\n" + format_report(report) + "\n")
    try:
        written.append(plot_report(run_dir / "report.png", report, passes))
    except ImportError as exc:  # matplotlib is pinned in the CPU stack; a trimmed GPU install may lack it
        log.warning("report.png skipped: %s", exc)
    return written


def plot_report(path: Path, report: Report, passes: Sequence[EvalPass]) -> Path:
    """Accuracy and search ratio per label of the policy's passes against the step; baselines as flat lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policy = sorted((p for p in passes if p.mode == POLICY), key=lambda p: p.step)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    colours = {"search_free": "tab:green", "search_required": "tab:blue", "": "black"}
    for ax, metric in zip(axes, METRICS):
        for label in ("", *LABELS):
            key = f"{metric}_{label}" if label else metric
            points = [(p.step, p.summary[key]) for p in policy if key in p.summary]
            if points:
                ax.plot(*zip(*points), "-o", color=colours[label], label=label or "all")
            for baseline, style in ((report.always_search, "--"), (report.never_search, ":")):
                if key in baseline and label:
                    ax.axhline(baseline[key], color=colours[label], linestyle=style, linewidth=1)
        ax.set_title(f"{metric.replace('_', ' ')} (held-out, greedy)")
        ax.set_xlabel("learner step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].plot([], [], "k--", linewidth=1, label="always search")
    axes[0].plot([], [], "k:", linewidth=1, label="never search")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
