"""Local search backends without sockets: ranking, hand-computed BM25, bad input, the factory and the conf file."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from ts_helpers import NUM_IMAGES, PAGES, draw_entity, perturb, png
from tool_servers.backends import build_backend
from tool_servers.backends.local_image import LocalImageSearch
from tool_servers.backends.local_text import BM25Index, LocalTextSearch, cut_text, load_pages, tokenize
from tool_servers.errors import ToolCallError
from tool_servers.limits import ServerLimits

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- BM25


def test_bm25_scores_match_hand_computation():
    # N = 3, avgdl = 2. idf(cat) = ln(1 + 1.5/2.5) = ln 1.6; idf(bird) = ln(1 + 2.5/1.5) = ln(8/3).
    index = BM25Index([["cat", "dog"], ["cat", "cat", "fish"], ["bird"]], k1=1.5, b=0.75)
    idf_cat, idf_bird = math.log(1.6), math.log(8 / 3)
    doc0 = idf_cat * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 2 / 2))  # tf 1, |d| 2
    doc1 = idf_cat * 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 3 / 2))  # tf 2, |d| 3
    doc2 = idf_bird * 1 * 2.5 / (1 + 1.5 * (0.25 + 0.75 * 1 / 2))  # tf 1, |d| 1
    assert index.scores(["cat"]) == pytest.approx([doc0, doc1, 0.0])
    hits = index.top_k(["cat", "bird"], k=3)
    assert [d for d, _ in hits] == [2, 1, 0]
    assert [s for _, s in hits] == pytest.approx([doc2, doc1, doc0])
    assert index.top_k(["cat", "cat"], k=3) == index.top_k(["cat"], k=3)  # distinct query terms
    assert index.top_k(["zebra"], k=3) == []


def test_tokenize_lowercases_words():
    assert tokenize("Who built Harrow's clock-tower?") == ["who", "built", "harrow", "s", "clock", "tower"]


def test_text_search_ranks_the_right_page_first(text_corpus):
    backend = LocalTextSearch(text_corpus, top_k=2, max_chars=300)
    cases = {"otter in the marshes": "Pondle", "glassblower born 1742": "Mirelle Tann",
             "violet lighthouse keeper": "Zorblax", "RIVER LUME": "Oskar"}
    results = backend.search_batch([{"query": q} for q in cases])
    for (query, title), items in zip(cases.items(), results):
        assert items[0].title == title, (query, [i.title for i in items])
        assert len(items) <= 2 and items[0].url.endswith(title.replace(" ", "_"))


def test_text_search_cuts_text_at_a_word_boundary(text_corpus):
    backend = LocalTextSearch(text_corpus, top_k=1, max_chars=20)
    (item,) = backend.search_batch([{"query": "Zorblax"}])[0]
    full = dict(PAGES)["Zorblax"]
    assert len(item.text) <= 20 and full.startswith(item.text) and full[len(item.text)] == " "
    assert cut_text("short", 20) == "short"
    assert cut_text("abcdefghijklmnopqrstuvwxyz", 10) == "abcdefghij"  # no space: hard cut


@pytest.mark.parametrize("args", [{"query": ""}, {"query": "   "}, {"query": "?!"}, {"query": 3}, {},
                                  {"query": "otter", "page": 2}])
def test_text_search_rejects_bad_args(text_corpus, args):
    backend = LocalTextSearch(text_corpus)
    with pytest.raises(ToolCallError) as info:
        backend.validate(args)
    assert info.value.code == "bad_request"
    # The same args inside a batch fail alone.
    results = backend.search_batch([args, {"query": "otter"}])
    assert isinstance(results[0], ToolCallError) and results[1][0].title == "Pondle"


def test_load_pages_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "title": "A", "text": "x"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_pages(path)
    path.write_text(json.dumps({"id": "a", "title": "A"}) + "\n")
    with pytest.raises(ValueError, match=r"'text'"):
        load_pages(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no pages"):
        load_pages(path)


# ---------------------------------------------------------------- image search


def test_perturbed_copies_find_their_original(image_corpus):
    backend = LocalImageSearch(image_corpus, top_k=3, thumbnail_size=32)
    results = backend.search_batch([{"image": png(perturb(draw_entity(i), seed=i))} for i in range(NUM_IMAGES)])
    for i, items in enumerate(results):
        assert [it.title for it in items][0] == f"Entity {i}", [it.title for it in items]
        assert len(items) == 3 and items[0].url == f"https://world.local/e{i}"
        with Image.open(io.BytesIO(items[0].image)) as thumb:
            assert thumb.format == "PNG" and max(thumb.size) <= 32


def test_image_search_rejects_bad_images_one_by_one(image_corpus):
    backend = LocalImageSearch(image_corpus, max_pixels=200 * 200)
    good = png(draw_entity(5))
    truncated = good[: len(good) // 2]
    huge = png(Image.new("RGB", (300, 300), (1, 2, 3)))
    results = backend.search_batch([{"image": b"not an image"}, {"image": truncated}, {"image": huge},
                                    {"image": good}, {"query": "x"}])
    codes = [r.code if isinstance(r, ToolCallError) else "ok" for r in results]
    assert codes == ["bad_request", "bad_request", "too_large", "ok", "bad_request"]
    assert results[3][0].title == "Entity 5"


def test_image_corpus_in_hugging_face_struct_format(tmp_path):
    path = tmp_path / "hf.parquet"
    rows = [{"id": f"e{i}", "image": {"bytes": png(draw_entity(i)), "path": None}, "title": f"E{i}", "url": ""}
            for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    backend = LocalImageSearch(path, top_k=1)
    assert backend.search_batch([{"image": png(draw_entity(2))}])[0][0].title == "E2"


def test_image_corpus_errors_name_the_problem(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "image": b"junk", "title": "A", "url": ""}]), path)
    with pytest.raises(ValueError, match=r"row 0 \(id 'a'\)"):
        LocalImageSearch(path)
    pq.write_table(pa.Table.from_pylist([{"id": "a", "title": "A"}]), path)
    with pytest.raises(ValueError, match="lacks columns"):
        LocalImageSearch(path)


# ---------------------------------------------------------------- factory, limits, conf


def test_build_backend_validates_its_config(text_corpus, image_corpus):
    text = build_backend("text_search", {"backend": "local", "corpus": str(text_corpus), "replicas": 3, "top_k": 1})
    assert isinstance(text, LocalTextSearch) and text.top_k == 1
    assert isinstance(build_backend("image_search", {"corpus": image_corpus}), LocalImageSearch)
    with pytest.raises(ValueError, match="unknown tool 'video_search'"):
        build_backend("video_search", {"corpus": text_corpus})
    with pytest.raises(ValueError, match="unknown backend 'serpapi'"):
        build_backend("text_search", {"backend": "serpapi", "corpus": text_corpus})
    with pytest.raises(ValueError, match="corpus is null"):
        build_backend("text_search", {"backend": "local", "corpus": None})
    with pytest.raises(ValueError, match=r"unknown knobs \['topk'\]"):
        build_backend("text_search", {"corpus": text_corpus, "topk": 3})


def test_server_limits_reject_typos_and_nonsense():
    assert ServerLimits.from_mapping({"max_queue": 4}).max_queue == 4
    with pytest.raises(ValueError, match="max_qeue"):
        ServerLimits.from_mapping({"max_qeue": 4})
    with pytest.raises(ValueError, match="max_batch"):
        ServerLimits(max_batch=0)


def test_conf_file_builds_servers(text_corpus, image_corpus):
    conf = yaml.safe_load((REPO / "conf/tool_servers/local.yaml").read_text())
    ServerLimits.from_mapping(conf["limits"])
    assert conf["image"]["corpus"] is None and conf["text"]["corpus"] is None  # filled by launch.py
    image = build_backend("image_search", {**conf["image"], "corpus": image_corpus})
    text = build_backend("text_search", {**conf["text"], "corpus": text_corpus})
    assert (image.top_k, image.thumbnail_size, text.top_k, text.max_chars) == (3, 56, 2, 300)
