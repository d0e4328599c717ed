"""Oracle episodes of the synthetic world for the warm start: the turns an ideal searching agent would produce for a
world question, with simulated tool results (episode/oracle.py renders them as chat messages and trajectories).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data.names import fresh_name
from data.world import PATTERNS, SEARCH_LABEL, Entity, World, replace_name
from episode import prompts
from episode.oracle import OracleEpisode, OracleTurn, SearchHit
from episode.turns import IMAGE_SEARCH, TEXT_SEARCH

@dataclass(frozen=True)
class OracleConfig:
    pixel_search_fraction: float = 0.5  # search-free questions that still search first: leaves RL something to fix
    fresh_name_fraction: float = 0.5  # search episodes whose names are all swapped for fresh random names, so the
    # model learns to copy names from results rather than memorise them (ENV.md: without it, held-out name
    # accuracy stayed at 0.25)
    image_results: int = 3  # hits per image search (the right entity first)
    text_results: int = 2  # hits per text search (the right page first)
    text_chars: int = 200  # page text is cut to this many characters, as a search snippet

    def validate(self) -> None:
        for name in ("pixel_search_fraction", "fresh_name_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1]")
        if self.image_results < 1 or self.text_results < 1 or self.text_chars < 1:
            raise ValueError(f"results per search must be >= 1: image={self.image_results} "
                             f"text={self.text_results} chars={self.text_chars}")


def _turn(reason: str, action: str) -> str:
    return f"{prompts.REASON_OPEN}{reason}{prompts.REASON_CLOSE}{action}"


def _answer(text: str) -> str:
    # Spaces inside the tags make the answer tokenize exactly like the same name in a result ("title: NAME"),
    # so copying is token-for-token.
    return f"{prompts.ANSWER_OPEN} {text} {prompts.ANSWER_CLOSE}"


def _text_query(query: str) -> str:
    return f"{prompts.TEXT_SEARCH_OPEN} {query} {prompts.TEXT_SEARCH_CLOSE}"


def _fact_sentence(name: str, attribute: str, value: str) -> str:
    if attribute == "city":
        return f"{name} was made in {value}"
    if attribute == "maker":
        return f"{name} was made by {value}"
    if attribute == "year":
        return f"{name} was made in {value}"
    raise ValueError(f"no fact sentence for attribute {attribute!r}")


class _Renamer:
    """Consistent entity-name substitution for one episode (identity when not swapping)."""

    def __init__(self, world: World, rng: np.random.Generator, swap: bool) -> None:
        self._rng, self._swap = rng, swap
        self._taken: set[str] = set(world.names()) if swap else set()
        self.mapping: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        if not self._swap:
            return name
        if name not in self.mapping:
            self.mapping[name] = fresh_name(self._rng, self._taken)
            self._taken.add(self.mapping[name])
        return self.mapping[name]

    def text(self, text: str) -> str:
        for old, new in self.mapping.items():
            text = replace_name(text, old, new)
        return text


def _others(world: World, entity: Entity, count: int, rng: np.random.Generator) -> list[Entity]:
    """`count` distractor entities from the same split (so test names never leak into training episodes)."""
    pool = [e for e in world.entities.values() if e.split == entity.split and e.name != entity.name]
    if len(pool) < count:
        raise ValueError(f"split {entity.split!r} has {len(pool)} other entities, need {count} distractors")
    picks = rng.choice(len(pool), size=count, replace=False)
    return [pool[int(i)] for i in picks]


def image_hits(world: World, entity: Entity, cfg: OracleConfig, rng: np.random.Generator,
               rename: _Renamer | None = None) -> tuple[SearchHit, ...]:
    """A perfect image search for `entity`: one of its corpus copies first, then distractors."""
    rename = rename or _Renamer(world, rng, swap=False)
    hits = []
    for e in [entity, *_others(world, entity, cfg.image_results - 1, rng)]:
        copies = world.images_by_entity[e.name]
        hits.append(SearchHit(title=rename(e.name), text="", image=copies[int(rng.integers(len(copies)))]))
    return tuple(hits)


def text_hits(world: World, entity: Entity, cfg: OracleConfig, rng: np.random.Generator,
              rename: _Renamer | None = None) -> tuple[SearchHit, ...]:
    """A perfect text search for `entity`: its page (cut to a snippet) first, then distractor pages."""
    rename = rename or _Renamer(world, rng, swap=False)
    hits = []
    for e in [entity, *_others(world, entity, cfg.text_results - 1, rng)]:
        title = rename(e.name)
        hits.append(SearchHit(title=title, text=rename.text(world.pages[e.name]["text"])[: cfg.text_chars],
                              image=None))
    return tuple(hits)


def oracle_episode(row: dict, world: World, rng: np.random.Generator, cfg: OracleConfig = OracleConfig()
                   ) -> OracleEpisode:
    """The ideal episode for question `row` (a questions.parquet row); `rng` decides searches, names, hits."""
    cfg.validate()
    kind = row["kind"]
    if kind not in SEARCH_LABEL:
        raise ValueError(f"question {row.get('id')!r} has unknown kind {kind!r}")
    entity = world.entities.get(row["entity"])
    if entity is None:
        raise ValueError(f"question {row.get('id')!r} is about unknown entity {row['entity']!r}")
    searches = kind != "pixels" or rng.random() < cfg.pixel_search_fraction
    rename = _Renamer(world, rng, swap=searches and rng.random() < cfg.fresh_name_fraction)
    name = rename(entity.name)
    question = rename.text(row["question"])
    answer = name if row["attribute"] == "name" else row["answer"]
    look = f"{entity.colour} {entity.shape}"
    image_call = prompts.IMAGE_SEARCH_CALL
    turns: list[OracleTurn] = []

    if kind == "pixels":
        if searches:
            turns.append(OracleTurn(_turn("i search the image to be sure.", image_call), IMAGE_SEARCH,
                                    image_hits(world, entity, cfg, rng, rename)))
        turns.append(OracleTurn(_turn(f"the image shows a {look} on a {PATTERNS[entity.pattern]} background.",
                                      _answer(answer)), None))
    elif kind == "image_search":
        turns.append(OracleTurn(_turn("i do not know this object, so i search the image.", image_call),
                                IMAGE_SEARCH, image_hits(world, entity, cfg, rng, rename)))
        turns.append(OracleTurn(_turn(f"the top result is {name}.", _answer(answer)), None))
    elif kind == "image_text_search":
        attribute = row["attribute"]
        turns.append(OracleTurn(_turn("i must identify the object first, so i search the image.", image_call),
                                IMAGE_SEARCH, image_hits(world, entity, cfg, rng, rename)))
        turns.append(OracleTurn(_turn(f"the object is {name}. now i need its {attribute}.",
                                      _text_query(f"{name} {attribute}")),
                                TEXT_SEARCH, text_hits(world, entity, cfg, rng, rename)))
        turns.append(OracleTurn(_turn(f"the page says {_fact_sentence(name, attribute, answer)}.", _answer(answer)),
                                None))
    else:  # text_search
        attribute = row["attribute"]
        turns.append(OracleTurn(_turn(f"i need the {attribute} of {name}, so i search the text.",
                                      _text_query(f"{name} {attribute}")),
                                TEXT_SEARCH, text_hits(world, entity, cfg, rng, rename)))
        turns.append(OracleTurn(_turn(f"the page says {_fact_sentence(name, attribute, answer)}.", _answer(answer)),
                                None))
    return OracleEpisode(question_id=row["id"], kind=kind, question=question, image=row["image"], answer=answer,
                         turns=tuple(turns), fresh_names=bool(rename.mapping))


def oracle_episodes(world: World, split: str, seed: int, cfg: OracleConfig = OracleConfig()) -> list[OracleEpisode]:
    """One oracle episode per question of `split`, in question order; deterministic in `seed`."""
    rng = np.random.default_rng([seed, 17])
    rows = [q for q in world.questions if q["split"] == split]
    if not rows:
        raise ValueError(f"world has no questions in split {split!r}")
    return [oracle_episode(row, world, rng, cfg) for row in rows]


def oracle_texts(world: World, seed: int, cfg: OracleConfig = OracleConfig()) -> Iterator[str]:
    """The assistant turns of one oracle episode per train question: the model's own phrases, for the tokenizer."""
    for episode in oracle_episodes(world, "train", seed, cfg):
        for turn in episode.turns:
            yield turn.assistant
