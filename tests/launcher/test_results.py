"""docs/results.* from given report.json files: the spread over seeds, the commands, and a missing report."""
from __future__ import annotations

import json

import pytest

from launcher.results import main, spread


def report(seed: int, end_acc: float, met: bool) -> dict:
    row = {"accuracy": end_acc, "accuracy_search_free": 1.0, "accuracy_search_required": 0.9, "search_ratio": 0.5,
           "search_ratio_search_free": 0.0, "search_ratio_search_required": 1.0}
    return {"start": dict(row, accuracy=0.9), "end": row, "always_search": row, "never_search": row, "seed": seed,
            "targets": {"accuracy > start": met}, "settings": {}, "met": met}


def test_spread_is_mean_plus_minus_half_the_range():
    assert spread([0.90, 0.96]) == "0.930 ± 0.030"
    assert spread([0.5]) == "0.500" and spread([]) == "-"


def test_collect_writes_json_and_markdown(tmp_path):
    runs = []
    for seed, acc, met in ((0, 0.94, True), (1, 0.90, False)):
        folder = tmp_path / f"default-s{seed}"
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps(report(seed, acc, met)))
        (folder / "warm_start.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n" + json.dumps(
            {"search_path": {"image_top1": 0.975, "seconds": 2.0}}) + "\n" + json.dumps(
            {"heldout_workflow": {"accuracy_pixels": 1.0, "accuracy_text_search": 0.875, "n": 16.0}}) + "\n")
        runs += ["--run", f"default={folder}"]
    (tmp_path / "notes.md").write_text("## What we saw\n\nwritten by hand\n")
    assert main([*runs, "--command", "default=python launch.py run.seed=SEED", "--out", str(tmp_path / "docs"),
                 "--notes", str(tmp_path / "notes.md")]) == 0
    data = json.loads((tmp_path / "docs" / "results.json").read_text())
    assert [r["seed"] for r in data["default"]] == [0, 1] and data["_meta"]["commands"]["default"]
    text = (tmp_path / "docs" / "results.md").read_text()
    assert text.index("## What we saw") < text.index("## default")
    assert "| end | 0.920 ± 0.020 |" in text and "python launch.py run.seed=SEED" in text
    assert "- accuracy > start: met, missed" in text
    assert data["default"][1]["warm_start"]["heldout_workflow"]["accuracy_text_search"] == 0.875
    assert "- seeds 0, 1, warm start held-out (each kind's search workflow): pixels 1.00, text_search 0.88" in text
    assert "- seeds 0, 1, search path (oracle through the real tool servers): image_top1 0.975" in text
    assert main(["--run", f"default={tmp_path / 'nowhere'}", "--out", str(tmp_path / "x")]) == 1
    with pytest.raises(SystemExit):
        main(["--run", f"bogus={tmp_path}"])
