"""Answer normalisation (pure): how a predicted answer is compared with the answer and its aliases, wherever an
answer is scored (the actors' reward, eval, curation, the warm start's evaluations).
"""
from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, punctuation to spaces, drop articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_matches(predicted: str | None, answer: str, aliases: list[str], match: str = "exact") -> bool:
    """Whether `predicted` matches the answer or an alias after normalisation (EM or word-boundary SubEM)."""
    if predicted is None:
        return False
    targets = {normalize_answer(a) for a in [answer, *aliases]} - {""}
    pred = normalize_answer(predicted)
    if match == "exact":
        return pred in targets
    padded = f" {pred} "
    return any(f" {t} " in padded for t in targets)
