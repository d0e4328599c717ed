"""Pronounceable made-up names (syllable-built) for entities, cities and makers, and fresh names for the oracle.

Names are lowercase ASCII letters only, so they survive normalisation and split into a few BPE pieces.
"""
from __future__ import annotations

import numpy as np

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kl", "pl", "st", "tr", "sk", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ee")
_CODAS = ("", "", "", "n", "r", "l", "s", "t", "x", "m", "k")
_CITY_SUFFIXES = ("by", "ton", "ham", "mar", "dale", "ford", "wick", "holm")

# Words the world itself uses; a name equal to one of them would make answers and pages ambiguous.
RESERVED_WORDS = frozenset({
    "a", "an", "the", "in", "by", "is", "was", "made", "city", "year", "maker", "object", "image", "on", "of",
    "background", "search", "answer", "reason", "title", "page", "it", "to", "and", "who", "what", "which",
})


def _syllable(rng: np.random.Generator) -> str:
    return (_ONSETS[int(rng.integers(len(_ONSETS)))] + _VOWELS[int(rng.integers(len(_VOWELS)))]
            + _CODAS[int(rng.integers(len(_CODAS)))])


def entity_name(rng: np.random.Generator) -> str:
    """A 2- or 3-syllable name such as 'zorblat'."""
    return "".join(_syllable(rng) for _ in range(int(rng.integers(2, 4))))


def city_name(rng: np.random.Generator) -> str:
    """One syllable plus a town suffix, such as 'quenby'."""
    return _syllable(rng) + _CITY_SUFFIXES[int(rng.integers(len(_CITY_SUFFIXES)))]


def maker_name(rng: np.random.Generator) -> str:
    """A 2-syllable person name such as 'talvo'."""
    return _syllable(rng) + _syllable(rng)


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
