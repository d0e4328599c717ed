"""The MMSearch-R1 reward of one finished episode: exact-match accuracy, format, and the search penalty. Pure.

    r = (1 - a) * acc * p + a * format,    a = format_weight (0.1)
    acc    = 1 when the last <answer> of the final turn equals the answer or an alias after normalisation
             (lowercase, punctuation and the articles a/an/the removed, whitespace collapsed), else 0
    p      = 1 - search_penalty (0.9) when the answer is correct and any search was made, else 1
    format = 1 when every turn holds exactly one <reason>...</reason> before its action, each non-final turn ends
             with exactly one search call, the final turn holds exactly one <answer>...</answer>, and the calls
             follow a valid pattern: answer | image -> answer | text -> answer | image -> text -> answer.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass

from actors import prompts

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_VALID_PATTERNS = {("answer",), ("image", "answer"), ("text", "answer"), ("image", "text", "answer")}
_ACTION_TAGS = {
    "image": (prompts.IMAGE_SEARCH_OPEN, prompts.IMAGE_SEARCH_CLOSE),
    "text": (prompts.TEXT_SEARCH_OPEN, prompts.TEXT_SEARCH_CLOSE),
    "answer": (prompts.ANSWER_OPEN, prompts.ANSWER_CLOSE),
}


@dataclass(frozen=True)
class RewardConfig:
    format_weight: float = 0.1
    search_penalty: float = 0.1


@dataclass(frozen=True)
class Reward:
    total: float
    accuracy: float
    format: float
    penalty: float  # the factor applied to the accuracy term (1.0 = no penalty)
    image_searches: int
    text_searches: int

    def parts(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "format": self.format, "penalty": self.penalty}


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lowercase, punctuation to spaces, drop articles, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def last_answer(turn: str) -> str | None:
    """Content of the last complete <answer>...</answer> in `turn`, or None."""
    end = turn.rfind(prompts.ANSWER_CLOSE)
    if end < 0:
        return None
    start = turn.rfind(prompts.ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return turn[start + len(prompts.ANSWER_OPEN):end]


def turn_action(turn: str) -> str | None:
    """The action a turn ends with: 'image', 'text' or 'answer' (by its closing tag), else None."""
    stripped = turn.rstrip()
    for action, (_, close) in _ACTION_TAGS.items():
        if stripped.endswith(close):
            return action
    return None


def _turn_well_formed(turn: str, final: bool) -> bool:
    if turn.count(prompts.REASON_OPEN) != 1 or turn.count(prompts.REASON_CLOSE) != 1:
        return False
    reason_end = turn.index(prompts.REASON_CLOSE)
    if turn.index(prompts.REASON_OPEN) > reason_end:
        return False
    action = turn_action(turn)
    if action is None or (action == "answer") != final:
        return False
    # exactly one action block, after the reasoning, and no other action's tags anywhere in the turn
    for name, (open_tag, close_tag) in _ACTION_TAGS.items():
        expected = 1 if name == action else 0
        if turn.count(open_tag) != expected or turn.count(close_tag) != expected:
            return False
    if turn.index(_ACTION_TAGS[action][0]) < reason_end:
        return False
    if action == "image":
        call = turn[turn.index(prompts.IMAGE_SEARCH_OPEN):].strip()
        return call.replace(" ", "") == prompts.IMAGE_SEARCH_CALL
    return True


def format_score(turns: list[str]) -> float:
    """1.0 when every turn is well formed and the sequence of actions is a valid pattern, else 0.0."""
    if not turns:
        return 0.0
    pattern = tuple(turn_action(t) for t in turns)
    if pattern not in _VALID_PATTERNS:
        return 0.0
    last = len(turns) - 1
    return float(all(_turn_well_formed(t, i == last) for i, t in enumerate(turns)))


def compute_reward(turns: list[str], answer: str, aliases: list[str], cfg: RewardConfig | None = None) -> Reward:
    """Reward of an episode whose assistant turns (decoded, tags included) are `turns`."""
    cfg = cfg or RewardConfig()
    image_searches = sum(turn_action(t) == "image" for t in turns[:-1])
    text_searches = sum(turn_action(t) == "text" for t in turns[:-1])
    predicted = last_answer(turns[-1]) if turns else None
    targets = {normalize_answer(a) for a in [answer, *aliases]} - {""}
    accuracy = float(predicted is not None and normalize_answer(predicted) in targets)
    penalty = 1.0 - cfg.search_penalty if accuracy and (image_searches + text_searches) > 0 else 1.0
    fmt = format_score(turns)
    a = cfg.format_weight
    total = (1.0 - a) * accuracy * penalty + a * fmt
    return Reward(total=total, accuracy=accuracy, format=fmt, penalty=penalty,
                  image_searches=image_searches, text_searches=text_searches)
