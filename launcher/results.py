"""Collect the reports of finished runs into docs/results.json and docs/results.md: the default run and the two
ablations of MMSearch-R1 (no search penalty; no search-free questions in training), each over several seeds.

    python -m launcher.results --run default=runs/results/default-s0 --run default=runs/results/default-s1 \
        --run no_penalty=runs/results/no_penalty-s0 ... [--out docs]

scripts/reproduce_results.sh runs the launches and then this. Every figure comes from a run's report.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

VARIANTS = ("default", "no_penalty", "no_search_free")
ROWS = ("start", "end", "always_search", "never_search")
COLUMNS = ("accuracy", "accuracy_search_free", "accuracy_search_required", "search_ratio",
           "search_ratio_search_free", "search_ratio_search_required")


def load_reports(runs: Sequence[tuple[str, Path]]) -> dict[str, list[dict[str, Any]]]:
    """{variant: [report.json of each run, with its folder]} in the order given; a missing report is an error."""
    out: dict[str, list[dict[str, Any]]] = {}
    for variant, folder in runs:
        path = Path(folder) / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no report (did the run finish? see {Path(folder) / 'logs'})")
        report = json.loads(path.read_text())
        report["run_dir"] = str(folder)
        report["warm_start"] = warm_start_figures(Path(folder))
        out.setdefault(variant, []).append(report)
    return out


def warm_start_figures(folder: Path) -> dict[str, Any]:
    """The run's warm_start.jsonl figures: the search-path check (`search_path`) and the warm start's held-out
    accuracy per kind when made to follow each kind's search workflow (`heldout_workflow`); {} when absent."""
    path = folder / "warm_start.jsonl"
    figures: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            for key in ("search_path", "heldout_workflow"):
                if key in row:
                    figures[key] = row[key]
    return figures


def spread(values: Sequence[float]) -> str:
    """mean ± half the range (min..max), the spread of a few seeds."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {(max(values) - min(values)) / 2:.3f}"


def markdown(reports: Mapping[str, list[dict[str, Any]]], commands: Mapping[str, str], machine: str) -> str:
    lines = ["# Results: search on demand on the embedded default", "",
             "Held-out questions of the synthetic world (test split: entities never seen in training), greedy. "
             "`start`/`end`: the policy at step 0 and at the last step; `always_search` (the RAG workflow) and "
             "`never_search`: the warm-started model, once. Each cell: mean ± half the range over the seeds.", "",
             f"Machine: {machine}", ""]
    for variant, runs in reports.items():
        seeds = [r["seed"] for r in runs]
        lines += [f"## {variant} (seeds {', '.join(str(s) for s in seeds)})", ""]
        if variant in commands:
            lines += ["```", commands[variant], "```", ""]
        lines.append("| | " + " | ".join(COLUMNS) + " |")
        lines.append("|---" * (len(COLUMNS) + 1) + "|")
        for row in ROWS:
            cells = [spread([r[row][c] for r in runs if c in r[row]]) for c in COLUMNS]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        met = [sum(bool(ok) for ok in r["targets"].values()) for r in runs]
        lines += ["", "Targets met per seed: " + ", ".join(f"seed {r['seed']}: {m}/{len(r['targets'])}"
                                                           for r, m in zip(runs, met)), ""]
        for target in runs[0]["targets"]:
            lines.append(f"- {target}: " + ", ".join("met" if r["targets"][target] else "missed" for r in runs))
        lines.append("")
        lines += warm_start_lines(runs)
    return "\n".join(lines) + "\n"


KIND_ORDER = ("pixels", "image_search", "image_text_search", "text_search")


def warm_start_lines(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per seed: the warm start's held-out accuracy per kind under its search workflow and the search-path check."""
    lines = []
    for r in runs:
        figures = r.get("warm_start") or {}
        workflow = figures.get("heldout_workflow") or {}
        kinds = [f"{k} {workflow[f'accuracy_{k}']:.2f}" for k in KIND_ORDER if f"accuracy_{k}" in workflow]
        if kinds:
            lines.append(f"- seed {r['seed']}, warm start held-out (each kind's search workflow): {', '.join(kinds)}")
        path = figures.get("search_path") or {}
        if path:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in path.items() if k != "seconds" and isinstance(v, float))
            lines.append(f"- seed {r['seed']}, search path (oracle through the real tool servers): {shown}")
    return lines + ([""] if lines else [])


def write_results(reports: Mapping[str, list[dict[str, Any]]], out_dir: Path, commands: Mapping[str, str]) -> None:
    machine = f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}"
    payload = {variant: runs for variant, runs in reports.items()}
    payload["_meta"] = {"machine": machine, "commands": dict(commands)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    (out_dir / "results.md").write_text(markdown(reports, commands, machine))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="VARIANT=RUN_DIR",
                        help=f"a finished run's folder; VARIANT is one of {VARIANTS} (repeat per seed)")
    parser.add_argument("--command", action="append", default=[], metavar="VARIANT=COMMAND",
                        help="the command that made the runs of VARIANT (shown in results.md)")
    parser.add_argument("--out", default="docs", help="where results.json and results.md go")
    args = parser.parse_args(argv)
    runs = []
    for item in args.run:
        variant, _, folder = item.partition("=")
        if variant not in VARIANTS or not folder:
            parser.error(f"--run {item!r}: expected VARIANT=RUN_DIR with VARIANT in {VARIANTS}")
        runs.append((variant, Path(folder)))
    commands = dict(item.partition("=")[::2] for item in args.command)
    try:
        reports = load_reports(runs)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_results(reports, Path(args.out), commands)
    print(f"wrote {Path(args.out) / 'results.json'} and results.md ({sum(len(v) for v in reports.values())} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
