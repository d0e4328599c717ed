"""The held-out tracker's schedule (step 0 with the baselines, every K steps one pass at a time, the final pass), its
metrics rows and the report it writes, against a stand-in for actor 0 and Ray's get/wait (the real path runs in
tests/e2e/test_launch.py's smoke run)."""
from __future__ import annotations

import json

import pytest

from launcher.heldout import HeldoutTracker, ReportConfig, per_kind, warm_start_line


class Ref:
    def __init__(self, value, actor=None):
        self.value, self.actor = value, actor

    @property
    def ready(self):
        return self.actor is None or not self.actor.hold


class StandInRay:
    def get(self, ref, timeout=None):
        if isinstance(ref.value, Exception):
            raise ref.value
        return ref.value

    def wait(self, refs, timeout=0):
        ready = [r for r in refs if r.ready]
        return ready, [r for r in refs if not r.ready]


class StandInActor:
    """evaluate.remote(mode, min_version, split, per_label): the policy answers the free questions right only after
    version 10; required questions always right when searching; records every call."""

    def __init__(self, fail=()):
        self.calls, self.fail, self.hold = [], set(fail), False
        actor = self

        class Method:
            def remote(self, mode, min_version, split, per_label):
                actor.calls.append((mode, min_version, split, per_label))
                if mode in actor.fail:
                    return Ref(RuntimeError(f"{mode} exploded"))
                searched = mode in ("always_search", "workflow") or (mode == "policy" and min_version < 10)
                samples = [{"kind": "pixels", "search_label": "search_free", "correct": min_version >= 10 or mode ==
                            "never_search", "searches": int(searched)},
                           {"kind": "image_search", "search_label": "search_required", "correct": mode != "never_search",
                            "searches": int(mode != "never_search")}]
                return Ref({"mode": mode, "version": min_version, "seconds": 1.5, "samples": samples}, actor)

        self.evaluate = Method()


def test_schedule_rows_and_report(tmp_path):
    actor = StandInActor()
    tracker = HeldoutTracker(ReportConfig(every=5, per_label=3), actor, StandInRay(), tmp_path, {"k": 1}, seed=7)
    workflow = tracker.start()
    assert [c[0] for c in actor.calls] == ["policy", "always_search", "never_search", "workflow"]
    assert all(c[1:] == (0, "test", 3) for c in actor.calls)
    assert workflow.summary["accuracy_image_search"] == 1.0 and "image_search 1.00" in warm_start_line(workflow)
    rows = tracker.drain_rows()
    assert [r["step"] for r in rows] == [0] * 4 and rows[0]["eval/policy/accuracy"] == 0.5
    actor.hold = True
    for step in range(1, 11):
        tracker.on_step(step)
        tracker.poll()
    assert [c[:2] for c in actor.calls[4:]] == [("policy", 5)]  # one pass at a time: step 10 waits for step 5's
    actor.hold = False
    tracker.poll()
    assert [r["step"] for r in tracker.drain_rows()] == [5]
    report = tracker.finish(12)
    assert actor.calls[-1][:2] == ("policy", 12)
    assert report.start["accuracy"] == 0.5 and report.end["accuracy"] == 1.0
    assert report.end["search_ratio_search_free"] == 0.0 and report.met
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["seed"] == 7 and saved["settings"] == {"k": 1}
    assert [e["step"] for e in saved["evals"]] == [0, 0, 0, 0, 5, 12]
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.png").exists()


def test_a_failed_pass_is_counted_and_a_missing_baseline_means_no_report(tmp_path):
    tracker = HeldoutTracker(ReportConfig(every=0), StandInActor(fail={"never_search"}), StandInRay(), tmp_path, {})
    tracker.start()
    assert tracker.failures == 1
    tracker.on_step(5)  # every=0: no pass during training
    assert tracker._pending is None
    assert tracker.finish(5) is None and not (tmp_path / "report.json").exists()


def test_config_and_per_kind():
    with pytest.raises(ValueError, match="unknown run.report keys"):
        ReportConfig.from_dict({"evry": 3})
    with pytest.raises(ValueError, match="bad run.report"):
        ReportConfig(every=-1)
    assert per_kind([{"kind": "pixels", "correct": True}, {"kind": "pixels", "correct": False}]) == \
        {"accuracy_pixels": 0.5}
