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
import os
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


def markdown(reports: Mapping[str, list[dict[str, Any]]], commands: Mapping[str, str], machine: str,
             notes: str = "") -> str:
    lines = ["# Results: search on demand on the embedded default", "",
             "Held-out questions of the synthetic world (test split: entities never seen in training), greedy. "
             "`start`/`end`: the policy at step 0 and at the last step; `always_search` (the RAG workflow) and "
             "`never_search`: the warm-started model, once. Each cell: mean ± half the range over the seeds.", "",
             f"Machine: {machine}", ""]
    if notes.strip():
        lines += [notes.strip(), ""]
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
    """The warm start's held-out accuracy per kind under its search workflow and the search-path check, one line
    each for the seeds that share the same figures (the cached warm start is the same for every seed)."""
    shown: dict[str, list[str]] = {}
    for r in runs:
        figures = r.get("warm_start") or {}
        workflow = figures.get("heldout_workflow") or {}
        kinds = [f"{k} {workflow[f'accuracy_{k}']:.2f}" for k in KIND_ORDER if f"accuracy_{k}" in workflow]
        if kinds:
            shown.setdefault(f"warm start held-out (each kind's search workflow): {', '.join(kinds)}", []).append(
                str(r["seed"]))
        path = figures.get("search_path") or {}
        if path:
            text = ", ".join(f"{k} {v:.3f}" for k, v in path.items() if k != "seconds" and isinstance(v, float))
            shown.setdefault(f"search path (oracle through the real tool servers): {text}", []).append(str(r["seed"]))
    lines = [f"- seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}, {text}" for text, seeds in shown.items()]
    return lines + ([""] if lines else [])


def machine_text() -> str:
    """This machine in a line: architecture, OS, Python, cores, memory."""
    memory = ""
    try:
        kib = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                       if line.startswith("MemTotal")).split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return (f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}, "
            f"{os.cpu_count()} cores{memory}")


def write_results(reports: Mapping[str, list[dict[str, Any]]], out_dir: Path, commands: Mapping[str, str],
                  notes: str = "") -> None:
    machine = machine_text()
    payload = {variant: runs for variant, runs in reports.items()}
    payload["_meta"] = {"machine": machine, "commands": dict(commands)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    (out_dir / "results.md").write_text(markdown(reports, commands, machine, notes))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="VARIANT=RUN_DIR",
                        help=f"a finished run's folder; VARIANT is one of {VARIANTS} (repeat per seed)")
    parser.add_argument("--command", action="append", default=[], metavar="VARIANT=COMMAND",
                        help="the command that made the runs of VARIANT (shown in results.md)")
    parser.add_argument("--out", default="docs", help="where results.json and results.md go")
    parser.add_argument("--notes", default=None, metavar="FILE",
                        help="a markdown file of written observations, shown after the header (the figures stay "
                             "generated)")
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
    notes = Path(args.notes).read_text() if args.notes else ""
    write_results(reports, Path(args.out), commands, notes)
    print(f"wrote {Path(args.out) / 'results.json'} and results.md ({sum(len(v) for v in reports.values())} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
