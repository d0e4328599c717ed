"""The seeded synthetic knowledge world: entities with drawn images and facts, an image corpus and a text corpus
for the search tools, and questions of four kinds, written as parquet/jsonl files and cached by config hash.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import names
from data.render import COLOURS, PATTERNS, SHAPES, TINTS, Look, random_perturbation, render
from protocol.files import build_dir_once
from protocol.images import encode_png

log = logging.getLogger(__name__)

# Bump whenever the generator's output changes for the same config, so caches built by older code are not reused.
FORMAT_VERSION = 2

KINDS: tuple[str, ...] = ("pixels", "image_search", "image_text_search", "text_search")
SEARCH_LABEL = {"pixels": "search_free", "image_search": "search_required",
                "image_text_search": "search_required", "text_search": "search_required"}
FACTS: tuple[str, ...] = ("city", "maker", "year")
URL_PREFIX = "https://world.forage.invalid/"

COLOUR_ALIASES: dict[str, list[str]] = {
    "red": ["scarlet", "crimson"], "green": ["emerald"], "blue": ["royal blue"], "yellow": ["gold", "golden"],
    "orange": ["amber"], "purple": ["violet"], "pink": ["rose"], "cyan": ["turquoise", "aqua"],
    "brown": ["chocolate"], "black": ["ebony"],
}
SHAPE_ALIASES: dict[str, list[str]] = {
    "circle": ["disc", "round"], "square": ["box"], "triangle": ["triangular"], "star": ["five-pointed star"],
    "diamond": ["rhombus"], "cross": ["plus"], "hexagon": ["hex"], "ring": ["donut", "annulus"],
    "crescent": ["moon", "crescent moon"], "arrow": ["pointer"],
}

PIXEL_QUESTIONS = {"colour": "what colour is the object in the image?",
                   "shape": "what shape is the object in the image?"}
NAME_QUESTION = "what is the name of the object in the image?"
IMAGE_FACT_QUESTIONS = {"city": "in which city was the object in the image made?",
                        "maker": "who made the object in the image?",
                        "year": "in which year was the object in the image made?"}
TEXT_FACT_QUESTIONS = {"city": "in which city was {name} made?",
                       "maker": "who made {name}?",
                       "year": "in which year was {name} made?"}
# A page states the entity's look and each fact in a sentence of its own that names the attribute and ends with the
# value, so a query-focused snippet ("NAME maker") finds the sentence (tool_servers' `snippet_sentences`) and the
# value closes it. Pages differ in the order of the fact sentences (PAGE_ORDERS).
FACT_SENTENCES: dict[str, str] = {
    "look": "{name} is a {colour} {shape} on a {pattern} background.",
    "city": "{name} was made in the city of {city}.",
    "maker": "{name} was made by the maker {maker}.",
    "year": "{name} was made in the year {year}.",
}
PAGE_ORDERS: tuple[tuple[str, ...], ...] = (
    ("look", "city", "maker", "year"), ("look", "maker", "year", "city"), ("look", "year", "city", "maker"),
)


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the synthetic world; every field takes part in the cache hash."""

    num_entities: int = 320
    image_size: int = 56  # 56x56 px = 4x4 patches of 14 = 4 vision tokens after 2x2 merge
    seed: int = 0
    test_fraction: float = 0.2  # share of entities (with all their questions) held out as split=test
    corpus_copies: int = 3  # perturbed copies of each entity's image in the image-search corpus
    max_shift: float = 1.5  # px; object shift of each rendering (question images and corpus copies)
    brightness_jitter: float = 0.06  # each rendering's brightness is scaled by 1 +- this
    noise_std: float = 4.0  # std of Gaussian pixel noise (0-255 scale)
    pixels_per_entity: int = 3  # search-free questions per entity (colour / shape, alternating)
    image_search_per_entity: int = 1
    image_text_search_per_entity: int = 1
    text_search_per_entity: int = 1
    num_cities: int = 20
    num_makers: int = 20
    year_min: int = 1600
    year_max: int = 1999

    @classmethod
    def from_dict(cls, values: Mapping) -> WorldConfig:
        """From a plain mapping (e.g. conf/data without its cache_root); unknown keys raise ValueError."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown world config keys: {sorted(unknown)}")
        return cls(**values)

    def validate(self) -> None:
        max_entities = len(SHAPES) * len(COLOURS) * len(PATTERNS)
        if not 1 <= self.num_entities <= max_entities:
            raise ValueError(f"num_entities={self.num_entities} must be in [1, {max_entities}] "
                             "(each entity needs its own shape x colour x pattern)")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction={self.test_fraction} must be in [0, 1)")
        if self.max_shift < 0 or not 0 <= self.brightness_jitter < 1 or self.noise_std < 0:
            raise ValueError(f"bad perturbation: max_shift={self.max_shift} brightness_jitter="
                             f"{self.brightness_jitter} noise_std={self.noise_std}")
        if self.corpus_copies < 1:
            raise ValueError(f"corpus_copies={self.corpus_copies} must be >= 1")
        if self.image_size < 28 or self.image_size % 28:
            raise ValueError(f"image_size={self.image_size} must be a positive multiple of 28 (patch 14 x merge 2)")
        counts = (self.pixels_per_entity, self.image_search_per_entity, self.image_text_search_per_entity,
                  self.text_search_per_entity)
        if min(counts) < 0 or sum(counts) == 0:
            raise ValueError(f"questions per entity {counts} must be >= 0 and not all 0")
        if self.num_cities < 1 or self.num_makers < 1 or self.year_max < self.year_min:
            raise ValueError(f"bad fact ranges: cities={self.num_cities} makers={self.num_makers} "
                             f"years=[{self.year_min}, {self.year_max}]")


def config_hash(cfg: WorldConfig) -> str:
    """A short stable hash of the config and the generator version (the cache key)."""
    payload = json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(cfg)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tint_of(shape: str, colour: str, pattern: str) -> int:
    """Background tint as a check digit: entities differing in one of shape/colour/pattern get different tints."""
    return (SHAPES.index(shape) + list(COLOURS).index(colour) + list(PATTERNS).index(pattern)) % len(TINTS)


@dataclass(frozen=True)
class Entity:
    index: int
    name: str
    shape: str
    colour: str
    pattern: str
    city: str
    maker: str
    year: int
    split: str

    @property
    def look(self) -> Look:
        return Look(self.shape, self.colour, self.pattern, tint_of(self.shape, self.colour, self.pattern))

    @property
    def url(self) -> str:
        return URL_PREFIX + self.name

    def fact(self, fact: str) -> str:
        if fact not in FACTS:
            raise ValueError(f"unknown fact {fact!r}; known: {FACTS}")
        return str(getattr(self, fact))


@dataclass(frozen=True)
class WorldPaths:
    """Where a written world lives; all files sit in `root`."""

    root: Path

    @property
    def questions(self) -> Path:
        return self.root / "questions.parquet"

    @property
    def image_corpus(self) -> Path:
        return self.root / "image_corpus.parquet"

    @property
    def text_corpus(self) -> Path:
        return self.root / "text_corpus.jsonl"

    @property
    def entities(self) -> Path:
        return self.root / "entities.jsonl"

    @property
    def world_json(self) -> Path:
        return self.root / "world.json"

    def info(self) -> dict:
        """The parsed world.json (config, config_hash, counts)."""
        return json.loads(self.world_json.read_text())

    def config_hash(self) -> str:
        return self.info()["config_hash"]


def _rng(cfg: WorldConfig, *stream: int) -> np.random.Generator:
    # Separate seeded streams per purpose keep one part of the world stable when another changes.
    return np.random.default_rng([cfg.seed, *stream])


def _rendering(cfg: WorldConfig, entity: Entity, *stream: int) -> bytes:
    """PNG of one perturbed rendering of `entity`, seeded by `stream`."""
    perturbation = random_perturbation(_rng(cfg, *stream), cfg.max_shift, cfg.brightness_jitter, cfg.noise_std)
    return encode_png(render(entity.look, cfg.image_size, perturbation))


def make_entities(cfg: WorldConfig) -> list[Entity]:
    """The world's entities: unique names and looks, facts, and the train/test split."""
    cfg.validate()
    rng = _rng(cfg, 0)
    taken: set[str] = set(COLOURS) | set(SHAPES) | set(PATTERNS) | set(PATTERNS.values())
    cities = names.unique_names(names.city_name, rng, cfg.num_cities, taken)
    makers = names.unique_names(names.maker_name, rng, cfg.num_makers, taken)
    entity_names = names.unique_names(names.entity_name, rng, cfg.num_entities, taken)
    combos = [(s, c, p) for s in SHAPES for c in COLOURS for p in PATTERNS]
    order = rng.permutation(len(combos))[: cfg.num_entities]
    num_test = int(round(cfg.num_entities * cfg.test_fraction))
    test_ids = set(rng.permutation(cfg.num_entities)[:num_test].tolist())
    entities = []
    for i, name in enumerate(entity_names):
        shape, colour, pattern = combos[int(order[i])]
        entities.append(Entity(
            index=i, name=name, shape=shape, colour=colour, pattern=pattern,
            city=cities[int(rng.integers(len(cities)))], maker=makers[int(rng.integers(len(makers)))],
            year=int(rng.integers(cfg.year_min, cfg.year_max + 1)),
            split="test" if i in test_ids else "train",
        ))
    return entities


def fact_sentence(attribute: str, name: str, value: str) -> str:
    """The page sentence that states `attribute` (look, city, maker, year) of entity `name`; for look, `value` is
    "colour shape pattern-adjective"."""
    if attribute == "look":
        colour, shape, pattern = value.split(" ", 2)
        return FACT_SENTENCES["look"].format(name=name, colour=colour, shape=shape, pattern=pattern)
    if attribute not in FACT_SENTENCES:
        raise ValueError(f"no page sentence for attribute {attribute!r}; known: {sorted(FACT_SENTENCES)}")
    return FACT_SENTENCES[attribute].format(name=name, **{attribute: value})


def read_fact(text: str, attribute: str, name: str) -> str | None:
    """The value of `attribute` (city, maker, year) of entity `name` as a page or snippet `text` states it in its
    FACT_SENTENCES sentence, or None when it does not: how a perfect reader (the search-path check) reads a hit."""
    if attribute not in FACTS:
        raise ValueError(f"attribute {attribute!r} is not a fact; known: {FACTS}")
    before, after = FACT_SENTENCES[attribute].split("{" + attribute + "}")
    pattern = re.escape(before.format(name=name)) + r"([a-z0-9]+)" + re.escape(after)
    match = re.search(pattern, text)
    return match.group(1) if match else None


def page_text(entity: Entity, order_index: int) -> str:
    """The entity's text-corpus page: its look and facts, one sentence each, in order PAGE_ORDERS[order_index]."""
    look = f"{entity.colour} {entity.shape} {PATTERNS[entity.pattern]}"
    values = {"look": look, "city": entity.city, "maker": entity.maker, "year": str(entity.year)}
    order = PAGE_ORDERS[order_index % len(PAGE_ORDERS)]
    return " ".join(fact_sentence(attribute, entity.name, values[attribute]) for attribute in order)


def answer_aliases(attribute: str, entity: Entity) -> tuple[str, list[str]]:
    """(answer, aliases) for a question about `attribute` of `entity`."""
    if attribute == "colour":
        return entity.colour, list(COLOUR_ALIASES[entity.colour])
    if attribute == "shape":
        return entity.shape, list(SHAPE_ALIASES[entity.shape])
    if attribute == "name":
        return entity.name, [f"the {entity.name}"]
    if attribute == "city":
        return entity.city, [f"{entity.city} city", f"the city of {entity.city}"]
    if attribute == "maker":
        return entity.maker, [f"master {entity.maker}", f"by {entity.maker}"]
    if attribute == "year":
        return str(entity.year), [f"year {entity.year}", f"in {entity.year}"]
    raise ValueError(f"unknown attribute {attribute!r}")


def _question_specs(cfg: WorldConfig, entity: Entity, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(kind, attribute, question text) for each question about `entity`; attributes cycle from a random start."""
    specs: list[tuple[str, str, str]] = []
    start = int(rng.integers(6))
    for k in range(cfg.pixels_per_entity):
        attr = ("colour", "shape")[(start + k) % 2]
        specs.append(("pixels", attr, PIXEL_QUESTIONS[attr]))
    for _ in range(cfg.image_search_per_entity):
        specs.append(("image_search", "name", NAME_QUESTION))
    for k in range(cfg.image_text_search_per_entity):
        fact = FACTS[(start + k) % 3]
        specs.append(("image_text_search", fact, IMAGE_FACT_QUESTIONS[fact]))
    for k in range(cfg.text_search_per_entity):
        fact = FACTS[(start + 1 + k) % 3]  # +1: a different fact than the image_text question when both are 1
        specs.append(("text_search", fact, TEXT_FACT_QUESTIONS[fact].format(name=entity.name)))
    return specs


QUESTIONS_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("question", pa.string()), ("answer", pa.string()),
    ("aliases", pa.list_(pa.string())), ("kind", pa.string()), ("search_label", pa.string()),
    ("split", pa.string()), ("entity", pa.string()), ("attribute", pa.string()),
])
IMAGE_CORPUS_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("title", pa.string()), ("url", pa.string()),
    ("entity", pa.string()),
])


def make_questions(cfg: WorldConfig, entities: list[Entity]) -> list[dict]:
    """All question rows, in a seeded shuffled order."""
    rows = []
    for e in entities:
        for k, (kind, attr, text) in enumerate(_question_specs(cfg, e, _rng(cfg, 1, e.index))):
            answer, aliases = answer_aliases(attr, e)
            rows.append({"id": "", "image": _rendering(cfg, e, 2, e.index, k), "question": text, "answer": answer,
                         "aliases": aliases, "kind": kind, "search_label": SEARCH_LABEL[kind], "split": e.split,
                         "entity": e.name, "attribute": attr})
    order = _rng(cfg, 3).permutation(len(rows))
    shuffled = [rows[int(i)] for i in order]
    for i, row in enumerate(shuffled):
        row["id"] = f"q{i:05d}"
    return shuffled


def make_image_corpus(cfg: WorldConfig, entities: list[Entity]) -> list[dict]:
    """`corpus_copies` perturbed renderings per entity, titled with the entity's name."""
    rows = []
    for e in entities:
        for c in range(cfg.corpus_copies):
            rows.append({"id": f"img-{e.name}-{c}", "image": _rendering(cfg, e, 4, e.index, c), "title": e.name,
                         "url": e.url, "entity": e.name})
    return rows


def make_text_corpus(cfg: WorldConfig, entities: list[Entity]) -> list[dict]:
    """One page per entity."""
    rng = _rng(cfg, 5)
    return [{"id": f"page-{e.name}", "title": e.name,
             "text": page_text(e, int(rng.integers(len(PAGE_ORDERS)))), "url": e.url} for e in entities]


def _write_parquet(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    # Fixed codec and no statistics-dependent options: the same rows give the same bytes.
    pq.write_table(table, path, compression="zstd", compression_level=3)


def _write_jsonl(rows: list[dict], path: Path) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def write_world(cfg: WorldConfig, out_dir: Path | str) -> WorldPaths:
    """Generates the world for `cfg` and writes it into `out_dir` (created if needed)."""
    cfg.validate()
    paths = WorldPaths(Path(out_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    entities = make_entities(cfg)
    questions = make_questions(cfg, entities)
    image_corpus = make_image_corpus(cfg, entities)
    pages = make_text_corpus(cfg, entities)
    _write_parquet(questions, QUESTIONS_SCHEMA, paths.questions)
    _write_parquet(image_corpus, IMAGE_CORPUS_SCHEMA, paths.image_corpus)
    _write_jsonl(pages, paths.text_corpus)
    _write_jsonl([dataclasses.asdict(e) for e in entities], paths.entities)
    counts: dict[str, int] = {"entities": len(entities), "image_corpus": len(image_corpus), "pages": len(pages),
                              "questions": len(questions)}
    for split in ("train", "test"):
        counts[f"entities_{split}"] = sum(e.split == split for e in entities)
        counts[f"questions_{split}"] = sum(q["split"] == split for q in questions)
    for kind in KINDS:
        counts[f"questions_{kind}"] = sum(q["kind"] == kind for q in questions)
    info = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(cfg), "config_hash": config_hash(cfg),
            "counts": counts}
    paths.world_json.write_text(json.dumps(info, sort_keys=True, indent=2) + "\n")
    return paths


def ensure_world(cfg: WorldConfig, cache_root: Path | str) -> WorldPaths:
    """The world for `cfg` under `cache_root/world-<hash>/`, generated once (atomically) and reused after."""
    cfg.validate()
    cache_root = Path(cache_root)
    key = config_hash(cfg)
    paths = WorldPaths(cache_root / f"world-{key}")
    if paths.world_json.exists():
        if paths.config_hash() != key:
            raise RuntimeError(f"cached world {paths.root} has hash {paths.config_hash()}, expected {key}")
        return paths
    # Another process may finish the same world first; its copy is identical.
    if build_dir_once(paths.root, lambda tmp: write_world(cfg, tmp), paths.world_json.name):
        log.info("built world %s", paths.root)
    return paths


@dataclass
class World:
    """A written world loaded into memory (for oracle episodes and evaluation)."""

    entities: dict[str, Entity]
    questions: list[dict]
    images_by_entity: dict[str, list[bytes]]
    pages: dict[str, dict]

    def names(self) -> frozenset[str]:
        return frozenset(self.entities)

    @functools.cached_property
    def cities(self) -> list[str]:
        return sorted({e.city for e in self.entities.values()})

    @functools.cached_property
    def makers(self) -> list[str]:
        return sorted({e.maker for e in self.entities.values()})

    @functools.cached_property
    def year_range(self) -> tuple[int, int]:
        years = [e.year for e in self.entities.values()]
        return min(years), max(years)


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def load_world(paths: WorldPaths) -> World:
    """Reads all files of a written world."""
    entities = {row["name"]: Entity(**row) for row in read_jsonl(paths.entities)}
    questions = pq.read_table(paths.questions).to_pylist()
    images: dict[str, list[bytes]] = {}
    for row in pq.read_table(paths.image_corpus).to_pylist():
        images.setdefault(row["entity"], []).append(row["image"])
    pages = {row["title"]: row for row in read_jsonl(paths.text_corpus)}
    return World(entities=entities, questions=questions, images_by_entity=images, pages=pages)


def world_texts(paths: WorldPaths) -> Iterator[str]:
    """All text of the world (questions, answers, aliases, pages, titles) for tokenizer training."""
    table = pq.read_table(paths.questions, columns=["question", "answer", "aliases"])
    for question, answer, aliases in zip(*(table.column(c).to_pylist() for c in ("question", "answer", "aliases"))):
        yield question
        yield answer
        yield from aliases
    for page in read_jsonl(paths.text_corpus):
        yield page["title"]
        yield page["text"]
    yield from pq.read_table(paths.image_corpus, columns=["title"]).column("title").to_pylist()


def replace_name(text: str, old: str, new: str) -> str:
    """`text` with whole-word occurrences of `old` replaced by `new`."""
    return re.sub(rf"\b{re.escape(old)}\b", new, text)
