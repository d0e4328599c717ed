"""Local text search: Okapi BM25 over a JSONL corpus of pages, in numpy, with no weights or downloads."""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from protocol import ToolItem
from tool_servers.backends.base import BatchResult
from tool_servers.errors import ToolCallError

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens (runs of letters, digits and underscores)."""
    return _WORD.findall(text.lower())


class BM25Index:
    """Okapi BM25 over tokenised documents, stored as postings (one weight per term-document pair).

    score(q, d) = sum over distinct query terms t present in d of
        idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)),
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))   (the Lucene variant, always positive),
    where tf is the term's count in d, |d| the document's token count, avgdl the mean of |d| over the corpus,
    df the number of documents containing t and N the number of documents. Each posting's weight is
    precomputed, so a query costs one scatter-add per query term.
    """

    def __init__(self, documents: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75) -> None:
        if not documents:
            raise ValueError("BM25Index needs at least one document")
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.vocab: dict[str, int] = {}
        term_ids, doc_ids, tfs = [], [], []
        doc_len = np.zeros(len(documents), dtype=np.float64)
        for d, tokens in enumerate(documents):
            ids = np.fromiter((self.vocab.setdefault(t, len(self.vocab)) for t in tokens), dtype=np.int64,
                              count=len(tokens))
            doc_len[d] = len(tokens)
            unique, counts = np.unique(ids, return_counts=True)
            term_ids.append(unique)
            doc_ids.append(np.full(unique.size, d, dtype=np.int64))
            tfs.append(counts.astype(np.float64))
        term = np.concatenate(term_ids)
        order = np.argsort(term, kind="stable")
        term, doc, tf = term[order], np.concatenate(doc_ids)[order], np.concatenate(tfs)[order]
        n_docs, n_terms = len(documents), len(self.vocab)
        df = np.bincount(term, minlength=n_terms).astype(np.float64)
        self.starts = np.concatenate([[0], np.cumsum(df).astype(np.int64)])
        idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
        avgdl = max(doc_len.mean(), 1e-9)
        norm = k1 * (1.0 - b + b * doc_len[doc] / avgdl)
        self.docs = doc
        self.weights = idf[term] * tf * (k1 + 1.0) / (tf + norm)
        self.num_docs = n_docs

    def scores(self, query_tokens: Sequence[str]) -> np.ndarray:
        """BM25 score of every document for the query (0 where no query term occurs)."""
        scores = np.zeros(self.num_docs, dtype=np.float64)
        for token in set(query_tokens):
            t = self.vocab.get(token)
            if t is not None:
                span = slice(self.starts[t], self.starts[t + 1])
                scores[self.docs[span]] += self.weights[span]  # doc ids are unique within one term's span
        return scores

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


def cut_text(text: str, max_chars: int) -> str:
    """At most max_chars characters, cut at a word boundary when one exists in the kept part."""
    if len(text) <= max_chars:
        return text
    kept = text[:max_chars]
    if not text[max_chars].isspace() and " " in kept:
        kept = kept[: kept.rfind(" ")]
    return kept.rstrip()


class LocalTextSearch:
    """BM25 over title + text of each page; args {"query": str}; items carry title, url and cut text."""

    name = "text_search"

    def __init__(self, corpus: str | Path, top_k: int = 2, max_chars: int = 300, k1: float = 1.5,
                 b: float = 0.75) -> None:
        if top_k < 1 or max_chars < 1:
            raise ValueError(f"top_k and max_chars must be >= 1, got top_k={top_k}, max_chars={max_chars}")
        self.top_k = top_k
        self.max_chars = max_chars
        self.pages = load_pages(corpus)
        self.index = BM25Index([tokenize(p["title"] + " " + p["text"]) for p in self.pages], k1=k1, b=b)
        log.info("text_search: indexed %d pages, %d terms from %s", len(self.pages), len(self.index.vocab), corpus)

    def validate(self, args: Mapping[str, Any]) -> None:
        extra = sorted(set(args) - {"query"})
        if extra:
            raise ToolCallError("bad_request", f"text_search takes only 'query'; unexpected arguments {extra}")
        query = args.get("query")
        if not isinstance(query, str):
            raise ToolCallError("bad_request", f"'query' must be a string, got {type(query).__name__}")
        if not tokenize(query):
            raise ToolCallError("bad_request", f"query {query!r} has no words")

    def search(self, query: str) -> list[ToolItem]:
        return [
            ToolItem(title=self.pages[d]["title"], url=self.pages[d]["url"],
                     text=cut_text(self.pages[d]["text"], self.max_chars))
            for d, _ in self.index.top_k(tokenize(query), self.top_k)
        ]

    def search_batch(self, batch: list[Mapping[str, Any]]) -> list[BatchResult]:
        results: list[BatchResult] = []
        for args in batch:
            try:
                self.validate(args)
                results.append(self.search(args["query"]))
            except Exception as exc:  # one bad request must not fail its batch-mates
                results.append(exc)
        return results

    def close(self) -> None:
        pass
