"""Oracle episodes of the synthetic world for the warm start: the turns an ideal searching agent would produce for a
world question, with simulated tool results (episode/oracle.py renders them as chat messages and trajectories).

The simulated results are what the local tool servers answer (tests/data/test_data_oracle.py checks them against
the real backends): image search = the entity's copies first, then distractors; text search = query-focused
snippets (`snippet_sentences`), the queried entity's page first. What makes the warm start *read* the results
rather than memorise the world: stand-in names and redrawn facts (`fresh_name_fraction`, `fact_shuffle_fraction`)
make every search episode's answer unknowable without copying it from what the tools returned (measured: with
half the episodes on real names, the model answered held-out image questions from the picture with a training
entity's name, accuracy 0.0; ENV.md for the history).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from data.names import city_name, fresh_name, maker_name
from data.world import FACTS, PATTERNS, SEARCH_LABEL, Entity, World, fact_sentence, page_text, replace_name
from episode import prompts
from episode.oracle import OracleEpisode, OracleTurn, SearchHit
from episode.turns import IMAGE_SEARCH, TEXT_SEARCH

# The assistant's phrases. Short on purpose: every token between a result and the copy of it is compute and
# distance for a 2-layer model; the fact turn quotes the snippet verbatim, so copying it is token for token.
SEARCH_IMAGE = "i search the image."
SEE = "i see a {look}."
TOP_RESULT = "the top result is {name}."
OBJECT_IS = "the object is {name}. i need its {attribute}."
NEED = "i need the {attribute} of {name}."
PAGE_SAYS = "the page says {sentence}"


@dataclass(frozen=True)
class OracleConfig:
    pixel_search_fraction: float = 0.7  # search-free questions that still search first: leaves RL something to fix
    fresh_name_fraction: float = 1.0  # search episodes whose entity names are all swapped for fresh random names
    fact_shuffle_fraction: float = 1.0  # search episodes whose facts (on every page shown) are redrawn at random
    fresh_value_fraction: float = 0.5  # of redrawn cities and makers: a made-up one (else one of the world's)
    rag_fraction: float = 0.15  # episodes (any kind) played as the RAG workflow under its hint (prompts.HINTS): image
    # search, text search for "NAME ATTRIBUTE" (colour/shape/name: the page's look sentence), answer; so the
    # always_search baseline measures the warm start rather than a turn order it never saw
    never_hint_fraction: float = 0.5  # search-free episodes answered directly that show the never_search hint
    image_results: int = 1  # hits per image search (the right entity first): tool_servers.image.top_k
    text_results: int = 1  # hits per text search (the queried page first): tool_servers.text.top_k
    snippet_sentences: int = 1  # text hits are the page's sentence the query names (1) or its beginning (0)
    text_chars: int = 300  # a text hit is cut to this many characters: tool_servers.text.max_chars

    def validate(self) -> None:
        for name in ("pixel_search_fraction", "fresh_name_fraction", "fact_shuffle_fraction", "fresh_value_fraction",
                     "rag_fraction", "never_hint_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1]")
        if self.image_results < 1 or self.text_results < 1 or self.text_chars < 1:
            raise ValueError(f"results per search must be >= 1: image={self.image_results} "
                             f"text={self.text_results} chars={self.text_chars}")
        if self.snippet_sentences not in (0, 1):
            raise ValueError(f"snippet_sentences={self.snippet_sentences}: the oracle simulates 0 (the page's "
                             "beginning) or 1 (the sentence of the queried fact)")


def _turn(reason: str, action: str) -> str:
    return f"{prompts.REASON_OPEN}{reason}{prompts.REASON_CLOSE}{action}"


def _answer(text: str) -> str:
    # Spaces inside the tags make the answer tokenize exactly like the same name in a result ("title: NAME"),
    # so copying is token-for-token.
    return f"{prompts.ANSWER_OPEN} {text} {prompts.ANSWER_CLOSE}"


def _text_query(query: str) -> str:
    return f"{prompts.TEXT_SEARCH_OPEN} {query} {prompts.TEXT_SEARCH_CLOSE}"


class _Episode:
    """What one episode shows in place of the world: consistent stand-in names and redrawn facts (identity when
    neither applies)."""

    def __init__(self, world: World, rng: np.random.Generator, cfg: OracleConfig, swap: bool, shuffle: bool) -> None:
        self._world, self._rng, self._cfg = world, rng, cfg
        self._swap, self._shuffle = swap, shuffle
        self._taken: set[str] = set(world.names()) if swap else set()
        self.mapping: dict[str, str] = {}
        self._entities: dict[str, Entity] = {}

    def name(self, name: str) -> str:
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

    def entity(self, entity: Entity) -> Entity:
        """`entity` as this episode shows it: stand-in name, and redrawn city, maker and year when shuffling."""
        if entity.name not in self._entities:
            shown = dataclasses.replace(entity, name=self.name(entity.name))
            if self._shuffle:
                shown = dataclasses.replace(shown, city=self._value("city"), maker=self._value("maker"),
                                            year=self._value("year"))
            self._entities[entity.name] = shown
        return self._entities[entity.name]

    def _value(self, fact: str) -> str | int:
        rng, world = self._rng, self._world
        if fact == "year":
            low, high = world.year_range
            return int(rng.integers(low, high + 1))
        if rng.random() < self._cfg.fresh_value_fraction:
            return (city_name if fact == "city" else maker_name)(rng)
        pool = world.cities if fact == "city" else world.makers
        return pool[int(rng.integers(len(pool)))]


def _others(world: World, entity: Entity, count: int, rng: np.random.Generator) -> list[Entity]:
    """`count` distractor entities from the same split (so test names never leak into training episodes)."""
    pool = [e for e in world.entities.values() if e.split == entity.split and e.name != entity.name]
    if len(pool) < count:
        raise ValueError(f"split {entity.split!r} has {len(pool)} other entities, need {count} distractors")
    picks = rng.choice(len(pool), size=count, replace=False)
    return [pool[int(i)] for i in picks]


def image_hits(world: World, entity: Entity, cfg: OracleConfig, rng: np.random.Generator,
               shown: _Episode | None = None) -> tuple[SearchHit, ...]:
    """A perfect image search for `entity`: one of its corpus copies first, then distractors."""
    shown = shown or _Episode(world, rng, cfg, swap=False, shuffle=False)
    hits = []
    for e in [entity, *_others(world, entity, cfg.image_results - 1, rng)]:
        copies = world.images_by_entity[e.name]
        hits.append(SearchHit(title=shown.name(e.name), text="", image=copies[int(rng.integers(len(copies)))]))
    return tuple(hits)


def text_hits(world: World, entity: Entity, attribute: str, cfg: OracleConfig, rng: np.random.Generator,
              shown: _Episode | None = None) -> tuple[SearchHit, ...]:
    """A perfect text search for `attribute` of `entity`: its page first, then distractor pages, each as the local
    text tool shows it for the query "NAME ATTRIBUTE": the sentence stating the fact (snippet_sentences=1; for any
    other attribute word, the look sentence that opens every page) or the page's beginning (0), cut to text_chars."""
    shown = shown or _Episode(world, rng, cfg, swap=False, shuffle=False)
    hits = []
    for e in [entity, *_others(world, entity, cfg.text_results - 1, rng)]:
        page = shown.entity(e)
        if cfg.snippet_sentences and attribute in FACTS:
            text = fact_sentence(attribute, page.name, page.fact(attribute))
        elif cfg.snippet_sentences:
            text = fact_sentence("look", page.name, f"{page.colour} {page.shape} {PATTERNS[page.pattern]}")
        else:
            text = page_text(page, int(rng.integers(3))) if (shown._shuffle or shown._swap) else \
                world.pages[e.name]["text"]
        hits.append(SearchHit(title=page.name, text=text[: cfg.text_chars], image=None))
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
    rag = rng.random() < cfg.rag_fraction
    searches = rag or kind != "pixels" or rng.random() < cfg.pixel_search_fraction
    shown = _Episode(world, rng, cfg, swap=searches and rng.random() < cfg.fresh_name_fraction,
                     shuffle=searches and rng.random() < cfg.fact_shuffle_fraction)
    subject = shown.entity(entity)
    name, attribute = subject.name, row["attribute"]
    question = shown.text(row["question"])
    answer = name if attribute == "name" else subject.fact(attribute) if attribute in FACTS else row["answer"]
    see = SEE.format(look=f"{entity.colour} {entity.shape}")
    image_call = prompts.IMAGE_SEARCH_CALL
    turns: list[OracleTurn] = []
    hint = "always_search" if rag else None
    if not searches and rng.random() < cfg.never_hint_fraction:
        hint = "never_search"

    def image_turn() -> OracleTurn:
        return OracleTurn(_turn(SEARCH_IMAGE, image_call), IMAGE_SEARCH, image_hits(world, entity, cfg, rng, shown))

    def text_turn(reason: str, about: str) -> OracleTurn:
        return OracleTurn(_turn(reason, _text_query(f"{name} {about}")), TEXT_SEARCH,
                          text_hits(world, entity, about, cfg, rng, shown))

    def fact_turn(hits: tuple[SearchHit, ...], about: str) -> OracleTurn:
        sentence = hits[0].text if cfg.snippet_sentences else fact_sentence(about, name, answer)
        return OracleTurn(_turn(PAGE_SAYS.format(sentence=sentence), _answer(answer)), None)

    if rag:  # the RAG workflow whatever the kind: image search, text search about the asked attribute, answer
        turns.append(image_turn())
        turns.append(text_turn(OBJECT_IS.format(name=name, attribute=attribute), attribute))
        turns.append(fact_turn(turns[-1].results, attribute))
    elif kind == "pixels":
        if searches:
            turns.append(image_turn())
        turns.append(OracleTurn(_turn(see, _answer(answer)), None))
    elif kind == "image_search":
        turns.append(image_turn())
        turns.append(OracleTurn(_turn(TOP_RESULT.format(name=name), _answer(answer)), None))
    elif kind == "image_text_search":
        turns.append(image_turn())
        turns.append(text_turn(OBJECT_IS.format(name=name, attribute=attribute), attribute))
        turns.append(fact_turn(turns[-1].results, attribute))
    else:  # text_search
        turns.append(text_turn(NEED.format(attribute=attribute, name=name), attribute))
        turns.append(fact_turn(turns[-1].results, attribute))
    return OracleEpisode(question_id=row["id"], kind=kind, question=question, image=row["image"], answer=answer,
                         turns=tuple(turns), fresh_names=bool(shown.mapping), hint=hint)


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

