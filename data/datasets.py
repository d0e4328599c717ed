"""Question datasets from disk into forage's questions schema (what actors read): parquet or JSONL files in the
FVQA / InfoSeek style that MMSearch-R1 uses, and image folders (an `metadata.jsonl|csv|parquet` beside the images).

Images come from a bytes column (raw bytes, `{"bytes", "path"}` structs, or a list of either: the first is used),
a local path column (relative paths resolve against `image_root`, default the dataset's folder), an InfoSeek-style
`image_id` (looked up as `image_root/<id>.<jpg|jpeg|png|webp>`), or a URL column that names a local file
(`file://...`). Remote URLs are never fetched: a row whose only image is an http(s) URL is an error that says so.
Every image is decoded once while converting, so a broken file fails here, naming its row, not mid-run.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from protocol.images import ImageError, open_image

log = logging.getLogger(__name__)

SEARCH_LABELS = ("search_required", "search_free")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".JPEG", ".JPG", ".PNG", ".bmp", ".gif")
TOPIC_LIKE_COLUMNS = ("category", "search_type")  # may hold search labels, or topics
METADATA_FILES = ("metadata.jsonl", "metadata.parquet", "metadata.csv", "questions.jsonl", "questions.parquet")

# The questions schema that actors/ reads (data/world.py writes the same columns, plus entity/attribute).
OUTPUT_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("id", pa.string()), ("image", pa.binary()), ("question", pa.string()), ("answer", pa.string()),
    ("aliases", pa.list_(pa.string())), ("kind", pa.string()), ("search_label", pa.string()),
)


class DatasetError(ValueError):
    """A dataset that cannot be converted; the message names the file and, for row problems, the row."""


@dataclass(frozen=True)
class ColumnMap:
    """Candidate column names per field, most specific first; "a.b" reads key b of a struct column a."""

    id: tuple[str, ...]
    image_bytes: tuple[str, ...]
    image_path: tuple[str, ...]
    image_id: tuple[str, ...]
    image_url: tuple[str, ...]
    question: tuple[str, ...]
    answer: tuple[str, ...]
    aliases: tuple[str, ...]
    search_label: tuple[str, ...]
    kind: tuple[str, ...]
    split: tuple[str, ...]


COLUMN_MAPS: dict[str, ColumnMap] = {
    # The synthetic world and anything already converted.
    "forage": ColumnMap(id=("id",), image_bytes=("image",), image_path=(), image_id=(), image_url=(),
                        question=("question",), answer=("answer",), aliases=("aliases",),
                        search_label=("search_label",), kind=("kind",), split=("split",)),
    # FVQA as released with MMSearch-R1 and its veRL layout (prompt messages, images list, reward_model struct).
    "fvqa": ColumnMap(id=("id", "data_id", "question_id", "extra_info.index", "index"),
                      image_bytes=("image", "images", "img"), image_path=("image_path", "file_name", "img_path"),
                      image_id=(), image_url=("image_url", "img_url", "url"),
                      question=("question", "query", "prompt"),
                      answer=("answer", "answers", "gold_answer", "reward_model.ground_truth", "ground_truth"),
                      aliases=("aliases", "candidate_answers", "reward_model.candidate_answers"),
                      search_label=("search_label", "category", "search_type", "search_required", "search_free",
                                    "extra_info.search_label", "extra_info.category"),
                      kind=("kind", "question_type", "data_source"), split=("split", "data_split")),
    # InfoSeek (OVEN images by image_id; answer list; answer_eval aliases).
    "infoseek": ColumnMap(id=("data_id", "id", "question_id"), image_bytes=("image",),
                          image_path=("image_path", "file_name"), image_id=("image_id",),
                          image_url=("image_url", "url"), question=("question",), answer=("answer", "answers"),
                          aliases=("answer_eval", "aliases", "candidate_answers"),
                          search_label=("search_label", "category", "search_required"),
                          kind=("question_type", "kind"), split=("data_split", "split")),
}
COLUMN_MAPS["auto"] = ColumnMap(**{
    name: tuple(dict.fromkeys(c for m in ("forage", "fvqa", "infoseek") for c in getattr(COLUMN_MAPS[m], name)))
    for name in ColumnMap.__dataclass_fields__
})
COLUMN_MAPS["folder"] = COLUMN_MAPS["auto"]
SCHEMAS = tuple(COLUMN_MAPS)


def convert_dataset(path: str | Path, out_path: str | Path, schema: str = "auto",
                    image_root: str | Path | None = None) -> Path:
    """Read `path` (parquet / JSONL file, or image folder), validate every row and image, and write a questions
    parquet at `out_path` that actors and the eval read. Returns `out_path`."""
    rows = read_dataset(path, schema, image_root)
    has_split = any(r.get("split") for r in rows)
    fields = list(OUTPUT_FIELDS) + ([("split", pa.string())] if has_split else [])
    table = pa.Table.from_pylist([{k: r[k] for k, _ in fields} for r in rows], schema=pa.schema(fields))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    labels = {label: sum(r["search_label"] == label for r in rows) for label in SEARCH_LABELS}
    log.info("dataset %s (%s): %d questions %s -> %s", path, schema, len(rows), labels, out)
    return out


def read_dataset(path: str | Path, schema: str = "auto", image_root: str | Path | None = None) -> list[dict]:
    """Rows in the questions schema (id, image bytes, question, answer, aliases, kind, search_label[, split])."""
    if schema not in COLUMN_MAPS:
        raise DatasetError(f"unknown dataset schema {schema!r}; expected one of {list(SCHEMAS)}")
    source = Path(path)
    if not source.exists():
        raise DatasetError(f"dataset {source} does not exist")
    table_path = _metadata_file(source) if source.is_dir() else source
    root = Path(image_root) if image_root is not None else table_path.parent
    raw = _read_table(table_path)
    columns = COLUMN_MAPS[schema]
    found = _resolve_columns(raw, columns, table_path)
    rows, seen = [], set()
    for index, record in enumerate(raw):
        row = _convert_row(record, index, found, root, table_path)
        if row["id"] in seen:
            raise DatasetError(f"{table_path} row {index}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise DatasetError(f"{table_path} has no rows")
    return rows


# ---------------------------------------------------------------------------------------------- reading

def _metadata_file(folder: Path) -> Path:
    for name in METADATA_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DatasetError(f"image folder {folder} has none of {list(METADATA_FILES)}: add a metadata file with "
                       "file_name, question and answer columns (Hugging Face imagefolder layout)")


def _read_table(path: Path) -> list[dict]:
    try:
        if path.suffix == ".parquet":
            return pq.read_table(path).to_pylist()
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        if path.suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    raise DatasetError(f"{path}: unsupported file type {path.suffix!r} (parquet, jsonl or csv)")


def _lookup(record: Mapping[str, Any], column: str) -> Any:
    value: Any = record
    for part in column.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _present(rows: list[dict], column: str) -> bool:
    """Whether any row has `column` (JSONL rows need not share keys; a struct key must hold a value somewhere)."""
    head, _, rest = column.partition(".")
    if not rest:
        return any(head in r for r in rows)
    return any(_lookup(r, column) is not None for r in rows)


def _resolve_columns(rows: list[dict], columns: ColumnMap, path: Path) -> dict[str, str | None]:
    """The first present candidate per field; a missing required field is an error listing what was looked for."""
    found = {name: next((c for c in getattr(columns, name) if _present(rows, c)), None)
             for name in ColumnMap.__dataclass_fields__}
    # A "category" column may hold topics rather than search labels: such a column counts only if it reads as labels
    # (a dedicated label column with a bad value is an error, naming the row).
    found["search_label"] = next((c for c in columns.search_label if _present(rows, c) and (
        c.rsplit(".", 1)[-1] not in TOPIC_LIKE_COLUMNS or _labels_column(rows, c))), None)
    available = sorted({k for r in rows[:100] for k in r})
    for name in ("question", "answer"):
        if found[name] is None:
            raise DatasetError(f"{path}: no {name} column (looked for {list(getattr(columns, name))}; "
                               f"the file has {available})")
    if not any(found[k] for k in ("image_bytes", "image_path", "image_id", "image_url")):
        raise DatasetError(f"{path}: no image column (looked for bytes {list(columns.image_bytes)}, paths "
                           f"{list(columns.image_path)}, ids {list(columns.image_id)}, urls "
                           f"{list(columns.image_url)}; the file has {available})")
    return found


def _labels_column(rows: list[dict], column: str) -> bool:
    try:
        for record in rows:
            search_label(_lookup(record, column), column, "")
    except DatasetError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- one row

def _convert_row(record: dict, index: int, found: Mapping[str, str | None], root: Path, path: Path) -> dict:
    def get(field: str) -> Any:
        column = found[field]
        return None if column is None else _lookup(record, column)

    raw_id = get("id")
    row_id = str(raw_id) if raw_id not in (None, "") else f"{path.stem}-{index:06d}"
    where = f"{path} row {index} (id {row_id!r})"
    question = _question_text(get("question"))
    if not question:
        raise DatasetError(f"{where}: empty question")
    answers = _strings(get("answer"))
    if not answers:
        raise DatasetError(f"{where}: empty answer")
    aliases = [a for a in dict.fromkeys(answers[1:] + _strings(get("aliases"))) if a != answers[0]]
    image = _image_bytes(get("image_bytes"), get("image_path"), get("image_id"), get("image_url"), root, where)
    return {"id": row_id, "image": image, "question": question, "answer": answers[0], "aliases": aliases,
            "kind": str(get("kind") or ""), "search_label": search_label(get("search_label"), found["search_label"],
                                                                         where),
            "split": str(get("split") or "")}


def _question_text(value: Any) -> str:
    """A question string, or the last user message of a chat `prompt` (veRL layout), image placeholders removed."""
    if isinstance(value, list):  # [{"role": ..., "content": str | [{"type": "text", "text": ...}, ...]}, ...]
        users = [m for m in value if isinstance(m, Mapping) and m.get("role", "user") == "user"]
        content = users[-1].get("content") if users else None
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
        value = content
    if value is None:
        return ""
    return " ".join(str(value).replace("<image>", " ").split())


def _strings(value: Any) -> list[str]:
    """Answer-like values as a list of non-empty strings: a string, a list, or InfoSeek's answer_eval entries
    (strings, or {"wikidata": value, "range": [...]} for numbers: the wikidata value is kept)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # a JSON-encoded list (CSV files)
            try:
                return _strings(json.loads(text))
            except json.JSONDecodeError:
                pass
        return [text] if text else []
    if isinstance(value, Mapping):
        return _strings(value.get("wikidata"))
    if isinstance(value, (int, float)):
        return [str(value)]
    if isinstance(value, Iterable):
        return [s for item in value for s in _strings(item)]
    return [str(value)]


def search_label(value: Any, column: str | None, where: str) -> str:
    """Normalise a search label: search_required / search_free / "" (unknown). Booleans read as "search is
    required" unless the column is named like `search_free`."""
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        free_column = column is not None and "free" in column.rsplit(".", 1)[-1]
        is_free = value if free_column else not value
        return "search_free" if is_free else "search_required"
    text = str(value).strip().lower().replace("-", "_").replace(" ", "_")
    if text in ("search_free", "free", "no_search", "not_required", "searchfree", "false", "0"):
        return "search_free"
    if text in ("search_required", "required", "search", "need_search", "searchrequired", "true", "1"):
        return "search_required"
    raise DatasetError(f"{where}: unknown search label {value!r} (expected one of {list(SEARCH_LABELS)})")


def _image_bytes(data: Any, path_value: Any, image_id: Any, url: Any, root: Path, where: str) -> bytes:
    """The row's image as encoded bytes, decoded once to prove it reads."""
    blob = _first_image(data)
    if isinstance(blob, str):  # an images list of paths
        path_value, blob = path_value or blob, None
    source = "bytes column"
    if blob is None and path_value:
        blob, source = _read_local(_resolve(str(path_value), root), where), f"path {path_value}"
    if blob is None and image_id:
        candidates = [root / f"{image_id}{suffix}" for suffix in IMAGE_SUFFIXES]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DatasetError(f"{where}: no image file for image_id {image_id!r} under {root} "
                               f"(tried {', '.join(IMAGE_SUFFIXES)}); set the image root")
        blob, source = _read_local(hit, where), f"path {hit}"
    if blob is None and url:
        parsed = urlparse(str(url))
        if parsed.scheme in ("http", "https", "ftp", "s3", "gs"):
            raise DatasetError(f"{where}: the image is only a URL ({url}); forage never fetches URLs: download "
                               "the images and give a path or bytes column")
        local = Path(unquote(parsed.path)) if parsed.scheme == "file" else _resolve(str(url), root)
        blob, source = _read_local(local, where), f"path {local}"
    if blob is None:
        raise DatasetError(f"{where}: no image (empty bytes, path, image_id and url)")
    _check_image(blob, where, source)
    return blob


def _first_image(value: Any) -> bytes | str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, Mapping):  # {"bytes": ..., "path": ...} (Hugging Face Image feature)
        return value.get("bytes") or value.get("path") or None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    if isinstance(value, str):
        return value or None
    return None


def _resolve(text: str, root: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else root / path


def _read_local(path: Path, where: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{where}: cannot read image file {path}: {exc.strerror or exc}") from exc


def _check_image(blob: bytes, where: str, source: str) -> None:
    try:
        open_image(blob)
    except ImageError as exc:
        raise DatasetError(f"{where}: unreadable image ({source}, {len(blob)} bytes): {exc}") from exc
