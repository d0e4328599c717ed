"""data/curation.py: labels from hand-computed accuracies, the balanced subset's sizes, the written parquet files."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from data.curation import CurationConfig, balanced_subset, label_question, label_questions, write_curated

CFG = CurationConfig(k=4, free_min_acc=0.5, required_min_acc=0.25, free_fraction=0.5, seed=1)


def _runs(qid: str, correct: list[bool]) -> list[dict]:
    return [{"id": qid, "correct": c} for c in correct]


def test_label_rules():
    assert label_question(acc_without=0.5, acc_with=0.0, cfg=CFG) == "search_free"  # at the threshold
    assert label_question(acc_without=0.25, acc_with=0.25, cfg=CFG) == "unsolved"  # search did not help
    assert label_question(acc_without=0.25, acc_with=0.5, cfg=CFG) == "search_required"
    assert label_question(acc_without=0.0, acc_with=0.0, cfg=CFG) == "unsolved"
    assert label_question(acc_without=0.0, acc_with=0.125, cfg=CFG) == "unsolved"  # below required_min_acc


def test_label_questions_from_eval_rows():
    with_search = _runs("a", [True] * 4) + _runs("b", [True, True, False, False]) + _runs("c", [False] * 4)
    without = _runs("a", [True, True, True, False]) + _runs("b", [False] * 4) + _runs("c", [False] * 4)
    records = {r["id"]: r for r in label_questions(with_search, without, CFG)}
    assert records["a"]["curated_label"] == "search_free" and records["a"]["acc_without_search"] == 0.75
    assert records["b"]["curated_label"] == "search_required" and records["b"]["acc_with_search"] == 0.5
    assert records["c"]["curated_label"] == "unsolved" and records["c"]["runs"] == 4
    with pytest.raises(ValueError, match="different questions"):
        label_questions(with_search, without[:8], CFG)


def test_balanced_subset_sizes_and_seeding():
    records = [{"id": f"f{i}", "curated_label": "search_free"} for i in range(7)] + \
              [{"id": f"r{i}", "curated_label": "search_required"} for i in range(3)] + \
              [{"id": "u", "curated_label": "unsolved"}]
    subset = balanced_subset(records, CFG)
    assert len([i for i in subset if i.startswith("f")]) == 3 and len([i for i in subset if i.startswith("r")]) == 3
    assert "u" not in subset and subset == balanced_subset(records, CFG)  # seeded: same draw
    two_to_one = balanced_subset(records, CurationConfig(k=4, free_fraction=2 / 3))
    assert sum(i.startswith("f") for i in two_to_one) == 6 and sum(i.startswith("r") for i in two_to_one) == 3
    assert balanced_subset([r for r in records if r["curated_label"] != "search_required"], CFG) == []


def test_config_validation():
    for bad in ({"k": 0}, {"free_min_acc": 0.0}, {"required_min_acc": 1.5}, {"free_fraction": 1.0}):
        with pytest.raises(ValueError):
            CurationConfig(**bad)


def test_write_curated_keeps_the_question_rows_and_relabels_them(small_paths, tmp_path):
    from actors.questions import load_questions

    rows = pq.read_table(small_paths.questions).to_pylist()[:6]
    labels = ["search_free", "search_required", "unsolved", "search_free", "search_required", "search_free"]
    records = [{"id": r["id"], "runs": 2, "acc_with_search": 1.0, "acc_without_search": 0.0, "curated_label": lab}
               for r, lab in zip(rows, labels)]
    subset = [rows[0]["id"], rows[1]["id"]]
    paths = write_curated(small_paths.questions, records, subset, tmp_path / "out")
    assert pq.read_table(paths["labels"]).num_rows == 6
    balanced = pq.read_table(paths["balanced"]).to_pylist()
    assert sorted(r["id"] for r in balanced) == sorted(subset)
    by_id = {r["id"]: r for r in balanced}
    assert by_id[rows[0]["id"]]["search_label"] == "search_free"
    assert by_id[rows[1]["id"]]["search_label"] == "search_required"
    assert by_id[rows[0]["id"]]["image"] == rows[0]["image"]  # original columns kept
    assert len(load_questions(paths["balanced"], None)) == 2
