"""The synthetic world: determinism, schema, balance, split by entity, facts in pages and answers, caching."""
from __future__ import annotations

import json
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from data import world as world_mod
from data.render import COLOURS, SHAPES
from data.world import (
    KINDS, SEARCH_LABEL, URL_PREFIX, WorldConfig, WorldPaths, config_hash, ensure_world, write_world, world_texts,
)
from protocol.images import decode_image

TINY = WorldConfig(num_entities=12, seed=5, corpus_copies=2)


@pytest.fixture
def small_cfg(small_paths) -> WorldConfig:
    return WorldConfig(**small_paths.info()["config"])


def test_same_seed_writes_identical_bytes(tmp_path):
    a, b = write_world(TINY, tmp_path / "a"), write_world(TINY, tmp_path / "b")
    for name in ("questions.parquet", "image_corpus.parquet", "text_corpus.jsonl", "entities.jsonl", "world.json"):
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name


def test_other_seed_gives_other_world(tmp_path):
    a = write_world(TINY, tmp_path / "a")
    b = write_world(WorldConfig(num_entities=12, seed=6, corpus_copies=2), tmp_path / "b")
    assert a.text_corpus.read_bytes() != b.text_corpus.read_bytes()
    assert config_hash(TINY) != config_hash(WorldConfig(num_entities=12, seed=6, corpus_copies=2))


def test_questions_schema_and_values(small_paths, small_world, small_cfg):
    table = pq.read_table(small_paths.questions)
    assert str(table.schema.field("image").type) == "binary"
    assert str(table.schema.field("aliases").type) == "list<element: string>"
    for column in ("id", "image", "question", "answer", "aliases", "kind", "search_label", "split", "entity"):
        assert column in table.column_names
    rows = small_world.questions
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["kind"] in KINDS and r["search_label"] == SEARCH_LABEL[r["kind"]]
        assert r["answer"] == r["answer"].lower().strip() and r["answer"]
        assert isinstance(r["aliases"], list) and all(isinstance(a, str) and a for a in r["aliases"])
        assert decode_image(r["image"]).size == (small_cfg.image_size, small_cfg.image_size)


def test_answers_match_entity_facts(small_world):
    for r in small_world.questions:
        e = small_world.entities[r["entity"]]
        expected = {"colour": e.colour, "shape": e.shape, "name": e.name, "city": e.city, "maker": e.maker,
                    "year": str(e.year)}[r["attribute"]]
        assert r["answer"] == expected
        assert (r["attribute"] in ("colour", "shape")) == (r["kind"] == "pixels")
        # Only text_search names the entity; the others must identify it from the image.
        assert (re.search(rf"\b{e.name}\b", r["question"]) is not None) == (r["kind"] == "text_search")


def test_kinds_and_search_labels_follow_config(small_world, small_cfg):
    rows = small_world.questions
    per_entity = {"pixels": small_cfg.pixels_per_entity, "image_search": small_cfg.image_search_per_entity,
                  "image_text_search": small_cfg.image_text_search_per_entity,
                  "text_search": small_cfg.text_search_per_entity}
    for kind, n in per_entity.items():
        assert sum(r["kind"] == kind for r in rows) == n * small_cfg.num_entities
    free = sum(r["search_label"] == "search_free" for r in rows)
    assert free == len(rows) // 2  # default 3 search-free : 3 search-required per entity
    for split in ("train", "test"):
        assert {r["kind"] for r in rows if r["split"] == split} == set(KINDS)
    # Pixel questions ask both colour and shape; fact questions cover all three facts.
    assert {r["attribute"] for r in rows if r["kind"] == "pixels"} == {"colour", "shape"}
    assert {r["attribute"] for r in rows if r["kind"] == "text_search"} == {"city", "maker", "year"}


def test_split_is_by_entity(small_world, small_cfg):
    split_of: dict[str, set[str]] = {}
    for r in small_world.questions:
        split_of.setdefault(r["entity"], set()).add(r["split"])
        assert small_world.entities[r["entity"]].split == r["split"]
    assert all(len(s) == 1 for s in split_of.values())
    n_test = sum(e.split == "test" for e in small_world.entities.values())
    assert n_test == round(small_cfg.num_entities * small_cfg.test_fraction)


def test_entities_unique_names_and_looks(small_world):
    entities = list(small_world.entities.values())
    names = [e.name for e in entities]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z]{4,}", n) for n in names)
    assert len({(e.shape, e.colour, e.pattern) for e in entities}) == len(entities)
    others = {e.city for e in entities} | {e.maker for e in entities} | set(COLOURS) | set(SHAPES)
    assert not set(names) & others


def test_pages_state_the_facts(small_paths, small_world, small_cfg):
    lines = small_paths.text_corpus.read_text().splitlines()
    assert len(lines) == small_cfg.num_entities
    for line in lines:
        page = json.loads(line)
        assert set(page) == {"id", "title", "text", "url"}
        e = small_world.entities[page["title"]]
        for fact in (e.name, e.city, e.maker, str(e.year), e.colour, e.shape):
            assert re.search(rf"\b{fact}\b", page["text"]), (fact, page["text"])
        assert page["url"] == URL_PREFIX + e.name and len(page["text"]) <= 200


def test_image_corpus_has_perturbed_copies(small_paths, small_cfg):
    rows = pq.read_table(small_paths.image_corpus).to_pylist()
    assert len(rows) == small_cfg.num_entities * small_cfg.corpus_copies
    by_entity: dict[str, list[bytes]] = {}
    for r in rows:
        assert r["title"] == r["entity"] and r["url"] == URL_PREFIX + r["entity"]
        by_entity.setdefault(r["entity"], []).append(r["image"])
    for copies in by_entity.values():
        assert len(set(copies)) == len(copies)  # perturbed, not duplicated
        assert all(decode_image(c).size == (small_cfg.image_size, small_cfg.image_size) for c in copies)


def _thumbnail_feature(png: bytes) -> np.ndarray:
    image = np.asarray(decode_image(png).resize((28, 28)), dtype=np.float32).ravel()
    return image / np.linalg.norm(image)


def test_question_images_find_their_entity_by_nearest_neighbour(small_world):
    # The image-search tool must be able to identify the pictured entity with plain whole-image features.
    titles, features = [], []
    for name, copies in small_world.images_by_entity.items():
        for png in copies:
            titles.append(name)
            features.append(_thumbnail_feature(png))
    matrix = np.stack(features)
    rows = [r for r in small_world.questions if r["kind"] in ("image_search", "image_text_search")]
    hits = sum(titles[int(np.argmax(matrix @ _thumbnail_feature(r["image"])))] == r["entity"] for r in rows)
    assert hits / len(rows) >= 0.95


def test_world_json_counts(small_paths, small_cfg):
    info = small_paths.info()
    assert info["config_hash"] == config_hash(small_cfg)
    counts = info["counts"]
    assert counts["entities"] == small_cfg.num_entities
    assert counts["questions"] == counts["questions_train"] + counts["questions_test"]
    assert counts["image_corpus"] == small_cfg.num_entities * small_cfg.corpus_copies


def test_world_texts_cover_questions_pages_and_titles(small_paths, small_world):
    texts = list(world_texts(small_paths))
    assert small_world.questions[0]["question"] in texts
    page = next(iter(small_world.pages.values()))
    assert page["text"] in texts and page["title"] in texts


def test_ensure_world_builds_once_and_reuses(tmp_path, monkeypatch):
    first = ensure_world(TINY, tmp_path)
    assert first.root == tmp_path / f"world-{config_hash(TINY)}"
    before = first.questions.stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("world rebuilt although cached")

    monkeypatch.setattr(world_mod, "write_world", must_not_build)
    again = ensure_world(TINY, tmp_path)
    assert again == first and again.questions.stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_ensure_world_leaves_no_partial_world_on_failure(tmp_path, monkeypatch):
    def broken(cfg, out_dir):
        (out_dir / "questions.parquet").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(world_mod, "write_world", broken)
    with pytest.raises(OSError, match="disk full"):
        ensure_world(TINY, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_ensure_world_rejects_a_cache_with_another_hash(tmp_path):
    paths = ensure_world(TINY, tmp_path)
    info = paths.info()
    info["config_hash"] = "0" * 16
    paths.world_json.write_text(json.dumps(info))
    with pytest.raises(RuntimeError, match="expected"):
        ensure_world(TINY, tmp_path)


@pytest.mark.parametrize("bad", [
    dict(num_entities=0), dict(num_entities=501), dict(test_fraction=1.0), dict(test_fraction=-0.1),
    dict(image_size=50), dict(corpus_copies=0), dict(pixels_per_entity=-1), dict(noise_std=-1.0),
    dict(pixels_per_entity=0, image_search_per_entity=0, image_text_search_per_entity=0, text_search_per_entity=0),
])
def test_bad_config_is_rejected(bad, tmp_path):
    with pytest.raises(ValueError):
        write_world(WorldConfig(**bad), tmp_path)


def test_world_paths_layout(tmp_path):
    paths = WorldPaths(tmp_path)
    assert paths.questions.name == "questions.parquet" and paths.text_corpus.suffix == ".jsonl"


def test_from_dict_rejects_unknown_keys():
    assert WorldConfig.from_dict({"num_entities": 30}) == WorldConfig(num_entities=30)
    with pytest.raises(ValueError, match="num_entites"):
        WorldConfig.from_dict({"num_entites": 30})
