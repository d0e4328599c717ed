"""Search backends without sockets: ranking, hand-computed BM25, faiss, embedders, corpora, bad input, the factory
and the conf files."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from protocol.images import encode_png
from tool_servers.backends import build_backend
from tool_servers.backends.local_image import LocalImageSearch
from tool_servers.backends.embedders import image_features
from tool_servers.backends.local_text import (
    BM25Index, LocalTextSearch, cut_text, load_pages, query_snippet, split_sentences, tokenize,
)
from tool_servers.backends.vector_index import VectorIndex
from tool_servers.cache import CacheConfig
from tool_servers.corpus import build_wiki_corpus, wiki_pages
from tool_servers.errors import ToolCallError
from tool_servers.limits import ServerLimits
from ts_helpers import NUM_IMAGES, PAGES, draw_entity, perturb

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- BM25


def test_bm25_scores_match_hand_computation():
    # N = 3, avgdl = 2. idf(cat) = ln(1 + 1.5/2.5) = ln 1.6; idf(bird) = ln(1 + 2.5/1.5) = ln(8/3).
    # Lucene's BM25: idf * tf / (tf + k1 * (1 - b + b * |d| / avgdl)), k1 = 1.5, b = 0.75.
    index = BM25Index([["cat", "dog"], ["cat", "cat", "fish"], ["bird"]], k1=1.5, b=0.75)
    idf_cat, idf_bird = math.log(1.6), math.log(8 / 3)
    doc0 = idf_cat * 1 / (1 + 1.5 * (0.25 + 0.75 * 2 / 2))  # tf 1, |d| 2
    doc1 = idf_cat * 2 / (2 + 1.5 * (0.25 + 0.75 * 3 / 2))  # tf 2, |d| 3
    doc2 = idf_bird * 1 / (1 + 1.5 * (0.25 + 0.75 * 1 / 2))  # tf 1, |d| 1
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


def test_query_snippet_keeps_the_sentences_that_share_most_words_with_the_query():
    page = "Tarn is a red ring. Tarn was made by the maker Oddo. Tarn was made in the year 1710. Is it old? Yes"
    assert split_sentences(page) == ["Tarn is a red ring.", "Tarn was made by the maker Oddo.",
                                     "Tarn was made in the year 1710.", "Is it old?", "Yes"]
    assert query_snippet(page, "tarn maker", 1) == "Tarn was made by the maker Oddo."
    assert query_snippet(page, "TARN YEAR", 1) == "Tarn was made in the year 1710."
    # ties go to the earlier sentence; two sentences come back in page order, not score order
    assert query_snippet(page, "tarn", 1) == "Tarn is a red ring."
    assert query_snippet(page, "old year", 2) == "Tarn was made in the year 1710. Is it old?"
    assert query_snippet(page, "unrelated", 1) == "Tarn is a red ring."
    assert query_snippet("One sentence only", "x", 3) == "One sentence only"
    with pytest.raises(ValueError, match="sentences=0"):
        query_snippet(page, "tarn", 0)


def test_text_search_returns_query_focused_snippets_when_asked(text_corpus):
    backend = LocalTextSearch(text_corpus, top_k=1, max_chars=300, snippet_sentences=1)
    ((item,),) = backend.search_batch([{"query": "born year Mirelle"}])
    assert item.title == "Mirelle Tann" and item.text == "She was born in the year 1742."
    whole = LocalTextSearch(text_corpus, top_k=1, max_chars=300)
    ((item,),) = whole.search_batch([{"query": "born year Mirelle"}])
    assert item.text == dict(PAGES)["Mirelle Tann"]
    with pytest.raises(ValueError, match="snippet_sentences"):
        LocalTextSearch(text_corpus, snippet_sentences=-1)


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
    results = backend.search_batch([{"image": encode_png(perturb(draw_entity(i), seed=i))} for i in range(NUM_IMAGES)])
    for i, items in enumerate(results):
        assert [it.title for it in items][0] == f"Entity {i}", [it.title for it in items]
        assert len(items) == 3 and items[0].url == f"https://world.local/e{i}"
        with Image.open(io.BytesIO(items[0].image)) as thumb:
            assert thumb.format == "PNG" and max(thumb.size) <= 32


def test_image_features_ignore_brightness_in_their_chromaticity_parts():
    picture = draw_entity(3)
    darker = Image.fromarray(np.clip(np.asarray(picture, np.float32) * 0.9, 0, 255).astype(np.uint8))
    a, b = image_features(picture), image_features(darker)
    assert a.shape == (707,) and np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    tail = slice(-(8 * 8 * 3 + 3), None)  # the chromaticity thumbnail and the background's chromaticity
    assert np.allclose(a[tail], b[tail], atol=0.01)
    other = image_features(draw_entity(4))
    assert float(a @ b) > float(a @ other)


def test_image_search_rejects_bad_images_one_by_one(image_corpus):
    backend = LocalImageSearch(image_corpus, max_pixels=200 * 200)
    good = encode_png(draw_entity(5))
    truncated = good[: len(good) // 2]
    huge = encode_png(Image.new("RGB", (300, 300), (1, 2, 3)))
    results = backend.search_batch([{"image": b"not an image"}, {"image": truncated}, {"image": huge},
                                    {"image": good}, {"query": "x"}])
    codes = [r.code if isinstance(r, ToolCallError) else "ok" for r in results]
    assert codes == ["bad_request", "bad_request", "too_large", "ok", "bad_request"]
    assert results[3][0].title == "Entity 5"


def test_image_corpus_in_hugging_face_struct_format(tmp_path):
    path = tmp_path / "hf.parquet"
    rows = [{"id": f"e{i}", "image": {"bytes": encode_png(draw_entity(i)), "path": None}, "title": f"E{i}", "url": ""}
            for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    backend = LocalImageSearch(path, top_k=1)
    assert backend.search_batch([{"image": encode_png(draw_entity(2))}])[0][0].title == "E2"


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
    assert (image.top_k, image.thumbnail_size, text.top_k, text.max_chars, text.snippet_sentences) == (1, 56, 1, 300, 1)
    for section in ("image", "text"):
        CacheConfig.from_mapping(conf[section]["cache"])


# ---------------------------------------------------------------- faiss, embedders, corpora


def test_vector_index_exact_and_hnsw_agree_and_reject_bad_shapes():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, 16)).astype(np.float32)
    queries = vectors[[3, 50, 199]] + rng.normal(scale=0.01, size=(3, 16)).astype(np.float32)
    for kind in ("flat", "hnsw"):
        scores, ids = VectorIndex(vectors, kind=kind).search(queries, k=5)
        assert ids.shape == (3, 5) and ids[:, 0].tolist() == [3, 50, 199], kind
        assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    assert VectorIndex(vectors[:2]).search(queries, k=5)[1].shape == (3, 2)  # k capped at the corpus size
    with pytest.raises(ValueError, match="queries must be"):
        VectorIndex(vectors).search(np.zeros((1, 3)), k=1)
    with pytest.raises(ValueError, match="non-empty"):
        VectorIndex(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="unknown vector index kind"):
        VectorIndex(vectors, kind="ivf")


def test_image_search_with_an_hnsw_index_and_a_folder_corpus(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(NUM_IMAGES):
        (folder / f"e{i:02d}.png").write_bytes(encode_png(draw_entity(i)))
    (folder / "notes.txt").write_text("not an image")
    (folder / "meta.jsonl").write_text(json.dumps({"file": "e03.png", "title": "Three", "url": "u3"}) + "\n")
    backend = LocalImageSearch(folder, top_k=2, index="hnsw")
    results = backend.search_batch([{"image": encode_png(perturb(draw_entity(i), seed=i))} for i in (3, 7)])
    assert [(i.title, i.url) for i in results[0]][0] == ("Three", "u3")
    assert results[1][0].title == "e07" and len(backend.ids) == NUM_IMAGES


def test_image_embedder_is_replaceable(image_corpus):
    class ColourOnly:
        """Mean colour: a toy embedder that proves the interface, nothing more."""
        dim = 3

        def embed_images(self, images):
            return np.stack([np.asarray(im.convert("RGB"), np.float32).mean(axis=(0, 1)) + 1e-3 for im in images])

    backend = LocalImageSearch(image_corpus, top_k=1, image_embedder=ColourOnly())
    assert backend.index.dim == 3
    assert backend.search_batch([{"image": encode_png(draw_entity(4))}])[0][0].title == "Entity 4"
    with pytest.raises(ValueError, match="needs model_path"):
        LocalImageSearch(image_corpus, embedder="hf")
    with pytest.raises(ValueError, match="not a local folder"):
        LocalImageSearch(image_corpus, embedder="hf", model_path="/nonexistent/clip")
    with pytest.raises(ValueError, match="unknown image embedder"):
        LocalImageSearch(image_corpus, embedder="resnet")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP saved as a normal checkpoint folder: exercises the real loading path."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config=dict(small, vocab_size=64, max_position_embeddings=16,
                                                      eos_token_id=2),
                                     vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}) \
        .save_pretrained(folder)
    return folder


def test_clip_checkpoint_from_a_local_folder_drives_image_search(image_corpus, tiny_clip):
    backend = LocalImageSearch(image_corpus, top_k=3, embedder="hf", model_path=str(tiny_clip))
    assert backend.index.dim == 16  # CLIP's projection
    results = backend.search_batch([{"image": encode_png(draw_entity(i))} for i in (0, 5)])
    # Random weights still map an image to one fixed vector: the corpus original is its own nearest neighbour.
    assert [r[0].title for r in results] == ["Entity 0", "Entity 5"] and all(len(r) == 3 for r in results)


def test_dense_text_search_with_the_bundled_minilm(text_corpus):
    backend = LocalTextSearch(text_corpus, top_k=2, mode="dense")
    assert backend.embedder.dim == 384
    queries = {"an animal that swims in wetlands": "Pondle", "bells rung at the coast": "Brass bells",
               "island nation with a green flag": "Quell"}
    results = backend.search_batch([{"query": q} for q in queries] + [{"query": "  "}])
    assert [r[0].title for r in results[:3]] == list(queries.values())
    assert isinstance(results[3], ToolCallError) and results[3].code == "bad_request"
    assert all(len(r) == 2 and r[0].text for r in results[:3])
    with pytest.raises(ValueError, match="model_path is for mode 'dense'"):
        LocalTextSearch(text_corpus, model_path="/x")
    with pytest.raises(ValueError, match="unknown text_search mode"):
        LocalTextSearch(text_corpus, mode="hybrid")


def test_wiki_corpus_from_the_installed_package(tmp_path):
    out = tmp_path / "wiki.jsonl"
    assert build_wiki_corpus(out, limit=50) == 50
    pages = load_pages(out)
    assert len(pages) == 50 and len({p["id"] for p in pages}) == 50
    assert all(p["title"] and len(p["text"]) > 50 and p["url"].startswith("https://en.wikipedia.org/wiki/")
               for p in pages)
    backend = LocalTextSearch(out, top_k=1)
    assert backend.search(pages[7]["title"])[0].title == pages[7]["title"]
    with pytest.raises(ValueError, match="unknown wiki language"):
        build_wiki_corpus(out, lang="de-de")


def test_wiki_pages_skip_entries_without_text(tmp_path):
    source = tmp_path / "summaries.json"
    source.write_text(json.dumps({"A": {"title": "Ada Lovelace", "extract": "Ada  was\na mathematician."},
                                  "B": {"title": "Empty", "extract": ""}, "C": "not an object",
                                  "D": {"title": "Río de la Plata", "extract": "A river."}}))
    pages = wiki_pages(source, "es-es")
    assert [p["title"] for p in pages] == ["Ada Lovelace", "Río de la Plata"]
    assert pages[0]["text"] == "Ada was a mathematician." and pages[1]["id"] == "wiki-es-es-1"
    assert pages[1]["url"] == "https://es.wikipedia.org/wiki/R%C3%ADo_de_la_Plata"
    source.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object"):
        wiki_pages(source)


def test_simulated_and_web_backends_build_from_config(monkeypatch):
    sim = build_backend("text_search", {"backend": "simulated", "latency_ms": 0, "corpus": "ignored", "top_k": 2})
    assert [i.title for i in sim.search_batch([{"query": "q"}])[0]] == ["q", "q"]
    assert isinstance(sim.search_batch([{"nope": 1}])[0], ToolCallError)
    monkeypatch.delenv("SERPAPI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="SERPAPI_API_KEY"):
        build_backend("text_search", {"backend": "web"})
    monkeypatch.setenv("SERPAPI_API_KEY", "k")
    with pytest.raises(ValueError, match=r"unknown knobs \['rate'\]"):
        build_backend("image_search", {"backend": "web", "rate": 3})
    web = build_backend("image_search", {"backend": "web", "rate_per_s": 3, "corpus": "/filled/by/launch"})
    try:
        assert web.limits.rate_per_s == 3
    finally:
        web.close()


def test_web_conf_file_builds_servers(monkeypatch):
    conf = yaml.safe_load((REPO / "conf/tool_servers/web.yaml").read_text())
    ServerLimits.from_mapping(conf["limits"])
    CacheConfig.from_mapping(conf["text"]["cache"])
    monkeypatch.setenv("SERPAPI_API_KEY", "k")
    for tool, section in (("image_search", "image"), ("text_search", "text")):
        backend = build_backend(tool, {**conf[section], "corpus": "/filled/in/by/launch.py"})
        try:
            assert backend.name == tool and backend.limits.retries == 2
        finally:
            backend.close()
