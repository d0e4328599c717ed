"""In-run evaluation on held-out questions (run.report): greedy passes of the policy at step 0, every `every` learner
steps and at the end, plus, once at step 0, the two baselines of the warm-started model (always_search: the RAG
workflow; never_search) and the search workflow each question's kind needs (the warm start's held-out check). The
passes run on rollout actor 0's engine beside its rollouts (actors/actor.py `evaluate`); each becomes a metrics row
of `eval/<mode>/...` keys at its step, and at the end launcher/report.py turns them into <run>/report.json/md/png.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from launcher.logs import STAGES
from launcher.report import (ALWAYS, NEVER, POLICY, EvalPass, Report, answered_accuracy, build_report, format_report,
                             summarize, write_report)

log = logging.getLogger(__name__)
stage = logging.getLogger(STAGES)

WORKFLOW = "workflow"
KINDS = ("pixels", "image_search", "image_text_search", "text_search")


@dataclass(frozen=True)
class ReportConfig:
    """conf/run: `report` — the in-run evaluation and the end-of-run report."""

    enabled: bool = True
    every: int = 25  # learner steps between policy passes (0: only step 0 and the end)
    split: Optional[str] = "test"  # held-out questions of this split (datasets without a split column: every row)
    per_label: Optional[int] = None  # the first N questions of each search label (None: every question of the split)
    baselines: bool = True  # always_search and never_search of the starting model, once at step 0
    timeout_s: float = 900.0  # one pass may take this long before the run gives up on it

    def __post_init__(self) -> None:
        if self.every < 0 or (self.per_label is not None and self.per_label < 1) or self.timeout_s <= 0:
            raise ValueError(f"bad run.report: every={self.every} per_label={self.per_label} "
                             f"timeout_s={self.timeout_s}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "ReportConfig":
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown run.report keys: {sorted(unknown)}")
        return cls(**values)


def per_kind(samples: list[Mapping[str, Any]]) -> dict[str, float]:
    """accuracy_<kind> of the kinds present (the warm start's figures are per question kind); samples a tool outage
    cut are left out, as in `summarize`."""
    out = {}
    for kind in KINDS:
        accuracy = answered_accuracy(s for s in samples if s.get("kind") == kind)
        if accuracy is not None:
            out[f"accuracy_{kind}"] = accuracy
    return out


def describe(summary: Mapping[str, float]) -> str:
    """One console line of a pass: accuracy and search ratio, overall and per label."""
    def get(key: str) -> str:
        return f"{summary[key]:.2f}" if key in summary else "-"

    return (f"acc {get('accuracy')} (free {get('accuracy_search_free')}, required {get('accuracy_search_required')})"
            f"  SR free {get('search_ratio_search_free')}, required {get('search_ratio_search_required')}"
            + (f"  ({int(summary['tool_failed'])} cut by a tool outage, left out of accuracy)"
               if summary.get("tool_failed") else ""))


class HeldoutTracker:
    """Schedules the passes on actor 0 and keeps them; `rows` of finished passes go to the run's sinks."""

    def __init__(self, cfg: ReportConfig, actor: Any, ray: Any, run_dir: Path, settings: Mapping[str, Any],
                 seed: int = 0) -> None:
        self.cfg, self.actor, self._ray, self.run_dir = cfg, actor, ray, Path(run_dir)
        self.settings, self.seed = dict(settings), seed
        self.passes: list[EvalPass] = []
        self.failures = 0
        self._pending: Optional[tuple[int, Any]] = None  # (step, ObjectRef) of the policy pass in flight
        self.report: Optional[Report] = None  # set by the metrics loop at the end
        self._rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ passes

    def _call(self, mode: str, min_version: int) -> Any:
        return self.actor.evaluate.remote(mode, min_version, self.cfg.split, self.cfg.per_label)

    def _record(self, step: int, result: Mapping[str, Any]) -> EvalPass:
        samples = result["samples"]
        summary = summarize(samples)
        if result["mode"] == WORKFLOW:
            summary.update(per_kind(samples))
        done = EvalPass(mode=result["mode"], step=step, version=int(result["version"]), summary=summary,
                        seconds=float(result["seconds"]))
        self.passes.append(done)
        self._rows.append({"step": step, **done.metrics(), f"eval/{done.mode}/version": float(done.version),
                           f"eval/{done.mode}/seconds": done.seconds})
        return done

    def _run_now(self, mode: str, step: int, min_version: int) -> Optional[EvalPass]:
        try:
            result = self._ray.get(self._call(mode, min_version), timeout=self.cfg.timeout_s)
        except Exception as exc:  # an eval that fails must not take the training run down; the report says so
            self.failures += 1
            log.error("held-out %s eval at step %d failed: %s", mode, step, exc)
            return None
        return self._record(step, result)

    def start(self) -> Optional[EvalPass]:
        """Step 0: the policy, the baselines and the warm start's workflow check (blocking, before training).
        Returns the workflow pass (None when it failed)."""
        started = time.monotonic()
        modes = [POLICY, *((ALWAYS, NEVER) if self.cfg.baselines else ()), WORKFLOW]
        refs = {mode: self._call(mode, 0) for mode in modes}  # one after the other on the actor (its engine lock)
        workflow = None
        for mode, ref in refs.items():
            try:
                result = self._ray.get(ref, timeout=self.cfg.timeout_s)
            except Exception as exc:
                self.failures += 1
                log.error("held-out %s eval at step 0 failed: %s", mode, exc)
                continue
            done = self._record(0, result)
            stage.info("held-out step 0, %s: %s (%d questions, %.0fs)", mode, describe(done.summary),
                       int(done.summary["n"]), done.seconds)
            workflow = done if mode == WORKFLOW else workflow
        stage.info("held-out evaluation at step 0 took %.0fs", time.monotonic() - started)
        return workflow

    def on_step(self, step: int) -> None:
        """After learner step `step`: a policy pass every `every` steps (one at a time, at version >= step)."""
        if self.cfg.every and step % self.cfg.every == 0 and self._pending is None:
            self._pending = (step, self._call(POLICY, step))

    def poll(self) -> None:
        """Collect the policy pass in flight if it is done."""
        if self._pending is None:
            return
        step, ref = self._pending
        ready, _ = self._ray.wait([ref], timeout=0)
        if not ready:
            return
        self._pending = None
        try:
            done = self._record(step, self._ray.get(ref))
        except Exception as exc:
            self.failures += 1
            log.error("held-out policy eval at step %d failed: %s", step, exc)
            return
        stage.info("held-out step %d: %s", step, describe(done.summary))

    def finish(self, last_step: int) -> Optional[Report]:
        """The final policy pass (at the last version) and the report files; None when a pass it needs is
        missing (said on the console)."""
        if self._pending is not None:
            step, ref = self._pending
            self._pending = None
            try:
                self._record(step, self._ray.get(ref, timeout=self.cfg.timeout_s))
            except Exception as exc:
                self.failures += 1
                log.error("held-out policy eval at step %d failed: %s", step, exc)
        if not any(p.mode == POLICY and p.step == last_step for p in self.passes):
            done = self._run_now(POLICY, last_step, last_step)
            if done is not None:
                stage.info("held-out step %d (end): %s", last_step, describe(done.summary))
        try:
            report = build_report(self.passes, self.settings, self.seed)
        except ValueError as exc:
            log.error("no report: %s", exc)
            return None
        write_report(self.run_dir, report, self.passes)
        return report

    def drain_rows(self) -> list[dict[str, Any]]:
        rows, self._rows = self._rows, []
        return rows


def warm_start_line(workflow: EvalPass) -> str:
    """The warm start's held-out figures: accuracy per kind when made to follow each kind's search workflow."""
    parts = [f"{kind} {workflow.summary[f'accuracy_{kind}']:.2f}" for kind in KINDS
             if f"accuracy_{kind}" in workflow.summary]
    return "warm start, held-out, each kind's search workflow: " + ", ".join(parts)


def record_warm_start(run_dir: Path, row: Mapping[str, Any]) -> None:
    """Append a row to <run>/warm_start.jsonl (the warm start's own rows, when this run trained it, come first)."""
    with open(Path(run_dir) / "warm_start.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")


def report_text(report: Optional[Report], run_dir_shown: str | Path) -> str:
    if report is None:
        return "no held-out report (an evaluation it needs failed; see the log)"
    return (f"held-out report ({'all targets met' if report.met else 'targets missed'}) -> "
            f"{Path(run_dir_shown) / 'report.md'}\n{format_report(report)}")


def start_tracker(conf: Mapping[str, Any], roles: Any, run_dir: Path) -> Optional[HeldoutTracker]:
    """The held-out tracker of a training run (None when run.report.enabled is false): its step-0 passes run now,
    before training starts; the warm start's held-out figures go to the console and <run>/warm_start.jsonl."""
    cfg = ReportConfig.from_dict(conf["run"].get("report"))
    if not cfg.enabled:
        return None
    if not roles.actors:
        raise RuntimeError("run.report needs a rollout actor to evaluate on")
    settings = {"run": {k: conf["run"][k] for k in ("mode", "max_steps", "seed", "report")},
                "algo": conf["algo"], "reward": conf["actors"]["reward"],
                "learner": {k: conf["learner"][k] for k in ("world_size", "lr", "lr_schedule", "warmup_steps", "decay_steps")},
                "actors": {k: conf["actors"][k] for k in ("num_actors", "max_concurrency")},
                "model": {"path": conf["model"]["path"], "tiny": conf["model"].get("tiny"),
                          "sft": conf["model"].get("sft")},
                "data": conf["data"]}
    tracker = HeldoutTracker(cfg, roles.actors[0], roles._ray, run_dir, settings, seed=int(conf["run"]["seed"]))
    workflow = tracker.start()
    if workflow is not None:
        stage.info(warm_start_line(workflow))
        record_warm_start(run_dir, {"heldout_workflow": dict(workflow.summary), "split": cfg.split,
                                    "per_label": cfg.per_label})
    return tracker
