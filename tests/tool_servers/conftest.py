"""Fixtures for tool_servers tests: small corpora written to tmp_path (the data world is not needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from protocol.images import encode_png
from ts_helpers import NUM_IMAGES, PAGES, draw_entity


@pytest.fixture(scope="session")
def image_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpora") / "images.parquet"
    rows = [
        {"id": f"e{i}", "image": encode_png(draw_entity(i)), "title": f"Entity {i}", "url": f"https://world.local/e{i}"}
        for i in range(NUM_IMAGES)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpora") / "pages.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i, (title, text) in enumerate(PAGES):
            handle.write(json.dumps({"id": f"p{i}", "title": title, "text": text,
                                     "url": f"https://world.local/{title.replace(' ', '_')}"}) + "\n")
    return path
