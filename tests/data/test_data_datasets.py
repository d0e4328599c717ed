"""data/datasets.py: FVQA- and InfoSeek-style parquet, JSONL and image folders into the questions schema; every
image decoded once; missing columns, unreadable images, remote-only URLs and bad labels named by row."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.datasets import DatasetError, convert_dataset, read_dataset, search_label
from testkit import solid_png


def _png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    return solid_png(colour, 28)


def _write(path: Path, rows: list[dict]) -> Path:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist would take the first row's keys only
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


def test_world_questions_convert_unchanged_and_actors_read_them(small_paths, tmp_path):
    from actors.questions import load_questions

    out = convert_dataset(small_paths.questions, tmp_path / "q.parquet", "forage")
    original = pq.read_table(small_paths.questions).to_pylist()
    converted = pq.read_table(out).to_pylist()
    assert [r["id"] for r in converted] == [r["id"] for r in original]
    for a, b in zip(original, converted):
        assert (a["image"], a["question"], a["answer"], a["aliases"], a["search_label"], a["split"]) == \
            (b["image"], b["question"], b["answer"], b["aliases"], b["search_label"], b["split"])
    assert len(load_questions(out, "train")) == sum(r["split"] == "train" for r in original)


def test_fvqa_verl_layout_prompt_images_reward_model_and_boolean_label(tmp_path):
    rows = [{"data_id": f"f{i}", "prompt": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": f"<image> what is pictured {i}?"}],
             "images": [{"bytes": _png((10 * i, 0, 0)), "path": None}],
             "reward_model": {"ground_truth": ["a lamp", "lamp", "the lamp"], "style": "rule"},
             "search_required": i % 2 == 0, "category": "objects"} for i in range(3)]
    out = read_dataset(_write(tmp_path / "fvqa.parquet", rows), "fvqa")
    assert [r["id"] for r in out] == ["f0", "f1", "f2"]
    assert out[1]["question"] == "what is pictured 1?"  # last user message, image placeholder gone
    assert out[0]["answer"] == "a lamp" and out[0]["aliases"] == ["lamp", "the lamp"]
    assert [r["search_label"] for r in out] == ["search_required", "search_free", "search_required"]
    assert out[0]["image"] == rows[0]["images"][0]["bytes"]


def test_fvqa_flat_columns_with_candidate_answers_and_category_labels(tmp_path):
    rows = [{"id": "a", "image": _png(), "question": "who?", "answer": "ada",
             "candidate_answers": ["Ada Lovelace", "ada"], "category": "search_free"},
            {"id": "b", "image": _png(), "question": "when?", "answer": "1843", "candidate_answers": None,
             "category": "Search Required"}]
    out = read_dataset(_write(tmp_path / "flat.parquet", rows))  # auto
    assert out[0]["aliases"] == ["Ada Lovelace"] and out[1]["aliases"] == []
    assert [r["search_label"] for r in out] == ["search_free", "search_required"]


def test_topic_category_is_not_mistaken_for_a_search_label(tmp_path):
    rows = [{"id": "a", "image": _png(), "question": "q", "answer": "x", "category": "landmark"}]
    assert read_dataset(_write(tmp_path / "topics.parquet", rows))[0]["search_label"] == ""


def test_infoseek_image_ids_resolve_under_the_image_root_and_answer_eval_gives_aliases(tmp_path):
    images = tmp_path / "oven"
    images.mkdir()
    (images / "oven_001.jpg").write_bytes(_png())
    (images / "oven_002.png").write_bytes(_png((0, 0, 200)))
    rows = [{"data_id": "infoseek_val_1", "image_id": "oven_001", "question": "which river?",
             "answer": ["Danube"], "answer_eval": ["Danube", "Donau"], "data_split": "val"},
            {"data_id": "infoseek_val_2", "image_id": "oven_002", "question": "how tall (m)?", "answer": ["324"],
             "answer_eval": [{"wikidata": 324.0, "range": [300, 350]}], "data_split": "val"}]
    path = tmp_path / "infoseek.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_path = convert_dataset(path, tmp_path / "out.parquet", "infoseek", image_root=images)
    out = pq.read_table(out_path).to_pylist()
    assert out[0]["answer"] == "Danube" and out[0]["aliases"] == ["Donau"] and out[0]["split"] == "val"
    assert out[1]["aliases"] == ["324.0"]
    assert out[1]["image"] == (images / "oven_002.png").read_bytes()


def test_image_folder_with_metadata_jsonl_and_file_urls(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "cat.png").write_bytes(_png())
    (tmp_path / "other.png").write_bytes(_png((1, 2, 3)))
    lines = [{"file_name": "imgs/cat.png", "question": "what animal?", "answer": "cat", "aliases": ["kitty"]},
             {"image_url": f"file://{tmp_path / 'other.png'}", "question": "colour?", "answer": "black"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = read_dataset(tmp_path, "folder")
    assert [r["answer"] for r in out] == ["cat", "black"] and out[0]["aliases"] == ["kitty"]
    assert out[1]["image"] == (tmp_path / "other.png").read_bytes()
    assert out[0]["id"] == "metadata-000000"  # no id column: file stem + row


def test_missing_columns_name_what_was_looked_for(tmp_path):
    with pytest.raises(DatasetError, match=r"no answer column .*the file has \['id', 'image', 'question'\]"):
        read_dataset(_write(tmp_path / "a.parquet", [{"id": "x", "image": _png(), "question": "q"}]))
    with pytest.raises(DatasetError, match="no image column"):
        read_dataset(_write(tmp_path / "b.parquet", [{"question": "q", "answer": "a"}]))
    with pytest.raises(DatasetError, match="has none of"):
        read_dataset(tmp_path)  # a folder without metadata
    with pytest.raises(DatasetError, match="unknown dataset schema"):
        read_dataset(tmp_path / "a.parquet", "coco")


def test_bad_rows_are_named(tmp_path):
    good = {"image": _png(), "question": "q", "answer": "a"}
    cases = [
        ({**good, "image": b"not an image"}, r"row 1 \(id 'r1'\): unreadable image \(bytes column"),
        ({**good, "image": None, "image_url": "https://example.org/x.jpg"}, r"row 1 .*never fetches URLs"),
        ({**good, "image": None, "image_path": "missing.png"}, r"row 1 .*cannot read image file .*missing.png"),
        ({**good, "answer": "  "}, r"row 1 \(id 'r1'\): empty answer"),
        ({**good, "question": None}, r"row 1 \(id 'r1'\): empty question"),
        ({**good, "search_label": "sometimes"}, r"row 1 .*unknown search label 'sometimes'"),
    ]
    for i, (bad, message) in enumerate(cases):
        rows = [{"id": "r0", **good, "search_label": "search_free"}, {"id": "r1", **bad}]
        with pytest.raises(DatasetError, match=message):
            read_dataset(_write(tmp_path / f"bad{i}.parquet", rows))
    with pytest.raises(DatasetError, match="duplicate id 'r0'"):
        read_dataset(_write(tmp_path / "dup.parquet", [{"id": "r0", **good}, {"id": "r0", **good}]))
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "nowhere.parquet")


def test_search_label_normalisation():
    assert search_label(True, "search_required", "") == "search_required"
    assert search_label(False, "search_required", "") == "search_free"
    assert search_label(True, "search_free", "") == "search_free"
    assert search_label("Search-Free", "category", "") == "search_free"
    assert search_label(None, "category", "") == ""
    with pytest.raises(DatasetError, match="row 7"):
        search_label("maybe", "category", "row 7")
