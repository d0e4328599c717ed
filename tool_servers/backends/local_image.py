"""Local reverse image search: image embeddings of a corpus in a faiss index, top-k {title, url, thumbnail}.

The default embedder is weight-free (thumbnails + colour histogram), good enough to find the corpus original of
a noisy, shifted or re-lit copy in the synthetic world; `embedder: hf` with `model_path` swaps in a CLIP or
SigLIP checkpoint from a local folder. The corpus is a parquet file or a folder of images (see `load_corpus`).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from protocol import ToolItem
from protocol.images import ImageError, open_image, png_thumbnail
from tool_servers.backends.base import BatchResult
from tool_servers.backends.embedders import (
    HFImageEmbedder,
    ImageEmbedder,
    ThumbnailHistogramEmbedder,
    image_features,
)
from tool_servers.backends.vector_index import VectorIndex
from tool_servers.errors import ToolCallError
from tool_servers.limits import ServerLimits, image_size

log = logging.getLogger(__name__)

EMBED_CHUNK = 256  # corpus images decoded and embedded at a time
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
EMBEDDERS = ("features", "hf")

__all__ = ["LocalImageSearch", "decode_within_limits", "image_features", "load_corpus"]


def decode_within_limits(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decoded image, or ToolCallError bad_request (undecodable) / too_large (over max_pixels)."""
    image_size(data, max_pixels)  # header first: never decode a pixel bomb
    try:
        return open_image(data)
    except ImageError as exc:  # truncated or corrupt data fails only at load()
        raise ToolCallError("bad_request", str(exc)) from exc


@dataclass
class ImageRecord:
    id: str
    title: str
    url: str
    data: bytes


def _image_bytes_column(table: pa.Table, path: str | Path) -> list[bytes]:
    column = table.column("image")
    # Hugging Face `Image` features are stored as struct<bytes, path>; plain binary columns are used as-is.
    if pa.types.is_struct(column.type):
        column = pa.chunked_array([chunk.field("bytes") for chunk in column.chunks])
    values = column.to_pylist()
    for row, value in enumerate(values):
        if not isinstance(value, bytes) or not value:
            raise ValueError(f"{path}: row {row} has no image bytes (got {type(value).__name__})")
    return values


def load_corpus(path: str | Path) -> list[ImageRecord]:
    """Image records from a parquet file (columns id, image, title, url?) or a folder.

    A folder holds image files (png/jpg/webp/gif/bmp); titles and urls come from an optional `meta.jsonl`
    beside them (`{"file": "x.png", "title": ..., "url": ...}` per line), else the title is the file's stem.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    table = pq.read_table(path)
    missing = {"id", "image", "title"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: image corpus lacks columns {sorted(missing)}; has {table.column_names}")
    ids = [str(v) for v in table.column("id").to_pylist()]
    titles = [str(v) for v in table.column("title").to_pylist()]
    urls = table.column("url").to_pylist() if "url" in table.column_names else [""] * table.num_rows
    images = _image_bytes_column(table, path)
    return [ImageRecord(i, t, u or "", d) for i, t, u, d in zip(ids, titles, urls, images)]


def _load_folder(folder: Path) -> list[ImageRecord]:
    meta: dict[str, dict[str, str]] = {}
    meta_path = folder / "meta.jsonl"
    if meta_path.exists():
        for lineno, line in enumerate(meta_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                meta[str(record["file"])] = record
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{meta_path}:{lineno}: expected {{file, title, url}}: {exc}") from exc
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [ImageRecord(id=p.name, title=str(meta.get(p.name, {}).get("title") or p.stem),
                        url=str(meta.get(p.name, {}).get("url") or ""), data=p.read_bytes()) for p in files]


def build_embedder(embedder: str, model_path: str | None, threads: int) -> ImageEmbedder:
    if embedder == "features":
        if model_path is not None:
            raise ValueError("embedder 'features' is weight-free and takes no model_path")
        return ThumbnailHistogramEmbedder()
    if embedder == "hf":
        if model_path is None:
            raise ValueError("embedder 'hf' needs model_path: a local CLIP/SigLIP checkpoint folder")
        return HFImageEmbedder(model_path, threads=threads)
    raise ValueError(f"unknown image embedder {embedder!r}; expected one of {EMBEDDERS}")


class LocalImageSearch:
    """Reverse image search over a local corpus; args {"image": bytes}; items {title, url, image=thumbnail}."""

    name = "image_search"

    def __init__(self, corpus: str | Path, top_k: int = 3, thumbnail_size: int = 56,
                 max_pixels: int = ServerLimits.max_image_pixels, embedder: str = "features",
                 model_path: str | None = None, index: str = "flat", hnsw_m: int = 32, threads: int = 1,
                 image_embedder: ImageEmbedder | None = None) -> None:
        if top_k < 1 or thumbnail_size < 1 or max_pixels < 1:
            raise ValueError(
                f"top_k, thumbnail_size and max_pixels must be >= 1, got {top_k}, {thumbnail_size}, {max_pixels}"
            )
        self.top_k = top_k
        self.thumbnail_size = thumbnail_size
        self.max_pixels = max_pixels
        start = time.perf_counter()
        records = load_corpus(corpus)
        if not records:
            raise ValueError(f"{corpus}: image corpus has no images")
        self.embedder = image_embedder or build_embedder(embedder, model_path, threads)
        self.ids = [r.id for r in records]
        self.titles = [r.title for r in records]
        self.urls = [r.url for r in records]
        self.thumbnails: list[bytes] = []
        vectors = []
        for start_row in range(0, len(records), EMBED_CHUNK):  # chunks: a big corpus is never all decoded at once
            images = []
            for row, record in enumerate(records[start_row:start_row + EMBED_CHUNK], start_row):
                try:
                    image = decode_within_limits(record.data, max_pixels)
                except ToolCallError as exc:
                    raise ValueError(f"{corpus}: row {row} (id {record.id!r}): {exc}") from exc
                images.append(image)
                self.thumbnails.append(png_thumbnail(image, thumbnail_size, Image.Resampling.BILINEAR))
            vectors.append(self.embedder.embed_images(images))
        self.index = VectorIndex(np.concatenate(vectors), kind=index, hnsw_m=hnsw_m, threads=threads)
        log.info("image_search: indexed %d images (%s, %d dimensions, faiss %s) from %s in %.2f s", len(self.ids),
                 type(self.embedder).__name__, self.index.dim, index, corpus, time.perf_counter() - start)

    def validate(self, args: Mapping[str, Any]) -> None:
        extra = sorted(set(args) - {"image"})
        if extra:
            raise ToolCallError("bad_request", f"image_search takes only 'image'; unexpected arguments {extra}")
        image = args.get("image")
        if not isinstance(image, bytes) or not image:
            raise ToolCallError(
                "bad_request", f"'image' must be non-empty encoded image bytes, got {type(image).__name__}"
            )

    def search_batch(self, batch: list[Mapping[str, Any]]) -> list[BatchResult]:
        results: list[BatchResult] = [[] for _ in batch]
        rows, queries = [], []
        for i, args in enumerate(batch):
            try:
                self.validate(args)
                queries.append(decode_within_limits(args["image"], self.max_pixels))
                rows.append(i)
            except Exception as exc:  # one bad image must not fail its batch-mates
                results[i] = exc
        if queries:
            _, ids = self.index.search(self.embedder.embed_images(queries), self.top_k)  # one search per batch
            for row, best in zip(rows, ids):
                results[row] = [ToolItem(title=self.titles[d], url=self.urls[d], image=self.thumbnails[d])
                                for d in best if d >= 0]
        return results

    def close(self) -> None:
        pass
