"""The end-of-run report's arithmetic from given eval samples, its target checks and the files it writes."""
from __future__ import annotations

import json

import pytest

from launcher.report import ALWAYS, NEVER, POLICY, EvalPass, build_report, format_report, summarize, write_report


def samples(free: list[tuple[bool, int]], required: list[tuple[bool, int]]) -> list[dict]:
    """(correct, searches) per sample of each label."""
    return ([{"correct": c, "searches": s, "search_label": "search_free"} for c, s in free]
            + [{"correct": c, "searches": s, "search_label": "search_required"} for c, s in required])


def test_summarize_counts_accuracy_and_search_ratio_per_label():
    rows = samples(free=[(True, 0), (True, 1), (False, 0), (True, 0)], required=[(True, 2), (False, 1)])
    out = summarize(rows)
    assert out["n"] == 6 and out["n_search_free"] == 4 and out["n_search_required"] == 2
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["search_ratio"] == pytest.approx(3 / 6)  # episodes with >= 1 search, not searches per episode
    assert out["accuracy_search_free"] == pytest.approx(3 / 4)
    assert out["search_ratio_search_free"] == pytest.approx(1 / 4)
    assert out["accuracy_search_required"] == pytest.approx(1 / 2)
    assert out["search_ratio_search_required"] == pytest.approx(1.0)
    only_free = summarize(samples(free=[(True, 0)], required=[]))
    assert "accuracy_search_required" not in only_free and only_free["accuracy"] == 1.0
    with pytest.raises(ValueError, match="no eval samples"):
        summarize([])


def test_summarize_leaves_tool_outages_out_of_accuracy_but_not_out_of_the_search_ratio():
    rows = samples(free=[(True, 0), (False, 0)], required=[(True, 1), (False, 1), (False, 1)])
    rows[3]["tool_failed"] = rows[4]["tool_failed"] = True  # two required episodes cut by an outage
    out = summarize(rows)
    assert out["n"] == 5 and out["tool_failed"] == 2 and out["tool_failed_search_required"] == 2
    assert "tool_failed_search_free" not in out
    assert out["accuracy"] == pytest.approx(2 / 3) and out["accuracy_search_required"] == 1.0
    assert out["search_ratio"] == pytest.approx(3 / 5) and out["search_ratio_search_required"] == 1.0
    rows[2]["tool_failed"] = True  # every required episode cut: no accuracy to report for that label
    assert "accuracy_search_required" not in summarize(rows)


def passes(end_free: list[tuple[bool, int]], end_required: list[tuple[bool, int]]) -> list[EvalPass]:
    start = summarize(samples(free=[(True, 1), (True, 0)], required=[(True, 1), (False, 1)]))  # acc .75, SR .75
    always = summarize(samples(free=[(True, 2), (False, 2)], required=[(True, 2), (True, 2)]))  # req acc 1.0
    never = summarize(samples(free=[(True, 0), (True, 0)], required=[(False, 0), (False, 0)]))  # acc .5
    return [EvalPass(POLICY, 0, 0, start), EvalPass(ALWAYS, 0, 0, always), EvalPass(NEVER, 0, 0, never),
            EvalPass(POLICY, 5, 5, summarize(samples(free=[(False, 0)] * 2, required=[(False, 0)] * 2))),
            EvalPass(POLICY, 10, 9, summarize(samples(free=end_free, required=end_required)))]


def test_report_takes_first_and_last_policy_pass_and_checks_every_target():
    report = build_report(passes(end_free=[(True, 0)] * 10, end_required=[(True, 1)] * 9 + [(False, 1)]),
                          settings={"run": "x"}, seed=3)
    assert report.start_step == 0 and report.end_step == 10
    assert report.start["accuracy"] == 0.75 and report.end["accuracy"] == pytest.approx(19 / 20)
    assert report.always_search["accuracy_search_required"] == 1.0 and report.never_search["accuracy"] == 0.5
    assert all(report.targets.values()) and report.met
    assert report.to_json()["seed"] == 3 and report.to_json()["settings"] == {"run": "x"}


@pytest.mark.parametrize("end_free, end_required, failed", [
    # one search-free episode in ten searches: 0.10 is not below 0.10
    ([(True, 0)] * 9 + [(True, 1)], [(True, 1)] * 10, "search_ratio_search_free < 0.1"),
    # required accuracy 0.8 < 0.9 x always_search's 1.0
    ([(True, 0)] * 10, [(True, 1)] * 8 + [(False, 1)] * 2, "accuracy_search_required >= 0.9 x always_search"),
    # accuracy 0.5 = never_search's: not above; and below the start's 0.75
    ([(True, 0)] * 10, [(False, 1)] * 10, "accuracy > never_search"),
])
def test_each_missed_target_is_reported(end_free, end_required, failed):
    report = build_report(passes(end_free, end_required))
    assert report.targets[failed] is False and not report.met
    assert f"- [ ] {failed}" in format_report(report)


def test_report_needs_both_baselines():
    with pytest.raises(ValueError, match="no never_search evaluation"):
        build_report([p for p in passes([(True, 0)], [(True, 1)]) if p.mode != NEVER])


def test_write_report_files(tmp_path):
    all_passes = passes(end_free=[(True, 0)] * 10, end_required=[(True, 1)] * 10)
    report = build_report(all_passes)
    written = write_report(tmp_path, report, all_passes)
    assert [p.name for p in written] == ["report.json", "report.md", "report.png"]
    data = json.loads((tmp_path / "report.json").read_text())
    for key in ("start", "end", "always_search", "never_search"):
        for metric in ("accuracy", "search_ratio", "accuracy_search_free", "search_ratio_search_free",
                       "accuracy_search_required", "search_ratio_search_required"):
            assert metric in data[key], (key, metric)
    assert data["met"] is True and len(data["evals"]) == 5
    assert "| policy, step 10 (end) |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert EvalPass(POLICY, 3, 2, {"accuracy": 0.5}).metrics() == {"eval/policy/accuracy": 0.5}
