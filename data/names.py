"""Pronounceable made-up names (consonant-vowel syllables) for entities, cities and makers, and fresh names for the
oracle. Names are lowercase ASCII letters only, so they survive normalisation.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Names are strings of consonant-vowel syllables from a small inventory (16 x 5 = 80). The tiny model's tokenizer
# learns each syllable as a token (models/ensure.py trains it on random names too), so a name is 2-3 tokens that
# the model copies out of a search result; measured: names of 2-6 irregular BPE pieces (the earlier
# onset-vowel-coda scheme, ~4.5 pieces) were copied far less reliably by the 2-layer model.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "th")
_VOWELS = ("a", "e", "i", "o", "u")
SYLLABLES: tuple[str, ...] = tuple(o + v for o in _ONSETS for v in _VOWELS)
_CITY_SUFFIXES = ("by", "ton", "ham", "mar", "dale", "ford", "wick", "holm")

# Words the world itself uses; a name equal to one of them would make answers and pages ambiguous.
RESERVED_WORDS = frozenset({
    "a", "an", "the", "in", "by", "is", "was", "made", "city", "year", "maker", "object", "image", "on", "of",
    "background", "search", "answer", "reason", "title", "page", "it", "to", "and", "who", "what", "which",
})


def _syllables(rng: np.random.Generator, count: int) -> str:
    return "".join(SYLLABLES[int(rng.integers(len(SYLLABLES)))] for _ in range(count))


def entity_name(rng: np.random.Generator) -> str:
    """A 2- or 3-syllable name such as 'zorima'."""
    return _syllables(rng, int(rng.integers(2, 4)))


def city_name(rng: np.random.Generator) -> str:
    """One syllable plus a town suffix, such as 'kuby'."""
    return _syllables(rng, 1) + _CITY_SUFFIXES[int(rng.integers(len(_CITY_SUFFIXES)))]


def maker_name(rng: np.random.Generator) -> str:
    """A 2-syllable person name such as 'talo'."""
    return _syllables(rng, 2)


def name_texts(rng: np.random.Generator, lines: int, per_line: int = 10) -> Iterator[str]:
    """Lines of random entity names: tokenizer training text that makes every syllable a token."""
    for _ in range(lines):
        yield " ".join(entity_name(rng) for _ in range(per_line))


def unique_names(make, rng: np.random.Generator, count: int, taken: set[str], max_tries: int = 100_000) -> list[str]:
    """`count` distinct names from `make(rng)` that are not in `taken` (which is updated in place)."""
    names: list[str] = []
    for _ in range(max_tries):
        if len(names) == count:
            return names
        name = make(rng)
        if len(name) < 4 or name in taken or name in RESERVED_WORDS:
            continue
        taken.add(name)
        names.append(name)
    if len(names) == count:
        return names
    raise RuntimeError(f"could only draw {len(names)} of {count} unique names in {max_tries} tries")


def fresh_name(rng: np.random.Generator, taken: set[str] | frozenset[str]) -> str:
    """One entity-like name not in `taken` (not added to it): the oracle's stand-in for a real name."""
    for _ in range(10_000):
        name = entity_name(rng)
        if len(name) >= 4 and name not in taken and name not in RESERVED_WORDS:
            return name
    raise RuntimeError("no fresh name found in 10000 tries")
