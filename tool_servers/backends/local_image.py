"""Local image search: weight-free image features (thumbnails + colour histogram) and cosine top-k in numpy.

Good enough to find the corpus original of a noisy, shifted or re-lit copy in the synthetic world; a learned
embedding (CLIP, faiss) slots in behind the same Backend interface later.
"""
from __future__ import annotations

import io
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from protocol import ToolItem
from tool_servers.backends.base import BatchResult
from tool_servers.errors import ToolCallError
from tool_servers.limits import ServerLimits, image_size

log = logging.getLogger(__name__)

GREY_SIDE = 16  # grey thumbnail side: coarse layout and shape
COLOUR_SIDE = 8  # colour thumbnail side: where the colours are
HIST_LEVELS = 4  # levels per channel of the joint RGB histogram (4**3 bins)
HIST_SIDE = 64  # the histogram is counted on a copy this small, so big images cost the same


def _unit(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 1e-12 else vector


def image_features(image: Image.Image) -> np.ndarray:
    """A unit float32 vector: mean-centred grey 16x16, colour 8x8 and a 64-bin colour histogram, equally weighted.

    Centring the grey thumbnail makes it ignore brightness shifts; the histogram ignores small translations;
    the colour thumbnail keeps the two apart when shapes agree but colours do not.
    """
    rgb = image.convert("RGB")
    grey = np.asarray(rgb.convert("L").resize((GREY_SIDE, GREY_SIDE), Image.Resampling.BOX), np.float32) / 255.0
    colour = np.asarray(rgb.resize((COLOUR_SIDE, COLOUR_SIDE), Image.Resampling.BOX), np.float32) / 255.0
    small = np.asarray(rgb.resize((HIST_SIDE, HIST_SIDE), Image.Resampling.BOX), np.int64)
    levels = small * HIST_LEVELS // 256
    bins = (levels[..., 0] * HIST_LEVELS + levels[..., 1]) * HIST_LEVELS + levels[..., 2]
    hist = np.bincount(bins.ravel(), minlength=HIST_LEVELS**3).astype(np.float32)
    parts = [_unit((grey - grey.mean()).ravel()), _unit(colour.ravel()), _unit(np.sqrt(hist))]
    return _unit(np.concatenate(parts)).astype(np.float32)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Fully decoded image, or ToolCallError bad_request (undecodable) / too_large (over max_pixels)."""
    image_size(data, max_pixels)  # header first: never decode a pixel bomb
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # truncated or corrupt data fails only at load()
        raise ToolCallError("bad_request", f"undecodable image ({len(data)} bytes): {exc}") from exc
    return image


def png_thumbnail(image: Image.Image, size: int) -> bytes:
    """PNG bytes of the image shrunk (aspect kept) so that neither side exceeds `size`."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    thumb.save(out, format="PNG")
    return out.getvalue()


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


class LocalImageSearch:
    """Cosine top-k over image features of a parquet corpus (id, image, title, url); args {"image": bytes}."""

    name = "image_search"

    def __init__(self, corpus: str | Path, top_k: int = 3, thumbnail_size: int = 56,
                 max_pixels: int = ServerLimits.max_image_pixels) -> None:
        if top_k < 1 or thumbnail_size < 1 or max_pixels < 1:
            raise ValueError(
                f"top_k, thumbnail_size and max_pixels must be >= 1, got {top_k}, {thumbnail_size}, {max_pixels}"
            )
        self.top_k = top_k
        self.thumbnail_size = thumbnail_size
        self.max_pixels = max_pixels
        start = time.perf_counter()
        table = pq.read_table(corpus)
        missing = {"id", "image", "title"} - set(table.column_names)
        if missing:
            raise ValueError(f"{corpus}: image corpus lacks columns {sorted(missing)}; has {table.column_names}")
        if table.num_rows == 0:
            raise ValueError(f"{corpus}: image corpus has no rows")
        self.ids = [str(v) for v in table.column("id").to_pylist()]
        self.titles = [str(v) for v in table.column("title").to_pylist()]
        urls = table.column("url").to_pylist() if "url" in table.column_names else [""] * table.num_rows
        self.urls = [v or "" for v in urls]
        features, self.thumbnails = [], []
        for row, data in enumerate(_image_bytes_column(table, corpus)):
            try:
                image = decode_image(data, max_pixels)
            except ToolCallError as exc:
                raise ValueError(f"{corpus}: row {row} (id {self.ids[row]!r}): {exc}") from exc
            features.append(image_features(image))
            self.thumbnails.append(png_thumbnail(image, thumbnail_size))
        self.matrix = np.stack(features)  # (N, D) unit rows: a dot product is the cosine
        log.info("image_search: indexed %d images (%d features each) from %s in %.2f s", len(self.ids),
                 self.matrix.shape[1], corpus, time.perf_counter() - start)

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
                queries.append(image_features(decode_image(args["image"], self.max_pixels)))
                rows.append(i)
            except Exception as exc:  # one bad image must not fail its batch-mates
                results[i] = exc
        if queries:
            similarity = np.stack(queries) @ self.matrix.T  # (B, N) cosines, one matrix product per batch
            k = min(self.top_k, self.matrix.shape[0])
            for row, sims in zip(rows, similarity):
                best = np.argsort(-sims, kind="stable")[:k]
                results[row] = [
                    ToolItem(title=self.titles[d], url=self.urls[d], image=self.thumbnails[d]) for d in best
                ]
        return results

    def close(self) -> None:
        pass
