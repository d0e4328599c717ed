"""The MMSearch-R1 reward of one finished episode: answer accuracy, format, and the search penalty. Pure.

    r = (1 - a) * acc * p + a * format,    a = format_weight (0.1)
    acc    = 1 when the last <answer> of the final turn matches the answer or an alias after normalisation
             (lowercase, punctuation and the articles a/an/the removed, whitespace collapsed), else 0.
             match="exact": equal strings (EM); match="subem": a target occurs in the prediction on word
             boundaries (SubEM; "red" matches "dark red", not "reddish").
    p      = 1 when the answer is wrong or no search was made; otherwise, with s = searches made and
             c = search_penalty · w (w = warm-up weight below):
               penalty_mode="any"        p = 1 - c                  (the paper: 0.9 for any number of searches)
               penalty_mode="per_search" p = max(0, 1 - c · s)      (each search costs c)
             w = min(1, version / penalty_warmup) when penalty_warmup > 0, else 1: the penalty grows linearly
             over the first `penalty_warmup` policy versions, so early RL is not taught to avoid search.
    format = 1 when every turn holds exactly one <reason>...</reason> before its action, each non-final turn ends
             with exactly one search call, the final turn holds exactly one <answer>...</answer>, and the calls
             follow one of `valid_patterns` (default: answer | image,answer | text,answer | image,text,answer).
"""
from __future__ import annotations

from dataclasses import dataclass

from episode import prompts
from episode.answers import answer_matches
from episode.turns import last_answer

_ACTION_TAGS = {
    "image": (prompts.IMAGE_SEARCH_OPEN, prompts.IMAGE_SEARCH_CLOSE),
    "text": (prompts.TEXT_SEARCH_OPEN, prompts.TEXT_SEARCH_CLOSE),
    "answer": (prompts.ANSWER_OPEN, prompts.ANSWER_CLOSE),
}
PAPER_PATTERNS = ("answer", "image,answer", "text,answer", "image,text,answer")


@dataclass(frozen=True)
class RewardConfig:
    format_weight: float = 0.1
    search_penalty: float = 0.1
    penalty_mode: str = "any"  # "any" | "per_search"
    penalty_warmup: int = 0  # policy versions over which the penalty rises linearly to its full value; 0 = off
    match: str = "exact"  # "exact" | "subem"
    valid_patterns: tuple[str, ...] = PAPER_PATTERNS  # comma-separated actions (image, text, answer) per pattern

    def __post_init__(self) -> None:
        if not 0.0 <= self.format_weight <= 1.0 or not 0.0 <= self.search_penalty <= 1.0:
            raise ValueError(f"format_weight and search_penalty must lie in [0, 1]: {self}")
        if self.penalty_mode not in ("any", "per_search"):
            raise ValueError(f"penalty_mode must be 'any' or 'per_search', got {self.penalty_mode!r}")
        if self.match not in ("exact", "subem"):
            raise ValueError(f"match must be 'exact' or 'subem', got {self.match!r}")
        if self.penalty_warmup < 0:
            raise ValueError(f"penalty_warmup must be >= 0, got {self.penalty_warmup}")
        object.__setattr__(self, "valid_patterns", tuple(self.valid_patterns))
        self.patterns()  # validate now, not at the first episode

    def patterns(self) -> frozenset[tuple[str, ...]]:
        """`valid_patterns` as action tuples; raises ValueError on an unknown action or a misplaced answer."""
        out = set()
        for pattern in self.valid_patterns:
            actions = tuple(a.strip() for a in pattern.split(","))
            if any(a not in _ACTION_TAGS for a in actions) or actions[-1] != "answer" or "answer" in actions[:-1]:
                raise ValueError(f"invalid turn pattern {pattern!r}: actions are image, text, answer, and exactly "
                                 f"the last one is answer")
            out.add(actions)
        return frozenset(out)


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


def format_score(turns: list[str], cfg: RewardConfig | None = None) -> float:
    """1.0 when every turn is well formed and the sequence of actions is a valid pattern, else 0.0."""
    if not turns:
        return 0.0
    pattern = tuple(turn_action(t) for t in turns)
    if pattern not in (cfg or _DEFAULT).patterns():
        return 0.0
    last = len(turns) - 1
    return float(all(_turn_well_formed(t, i == last) for i, t in enumerate(turns)))


def search_penalty_factor(correct: bool, searches: int, cfg: RewardConfig, version: int = 0) -> float:
    """The factor p of the module docstring."""
    if not correct or searches <= 0:
        return 1.0
    weight = min(1.0, max(version, 0) / cfg.penalty_warmup) if cfg.penalty_warmup > 0 else 1.0
    cost = cfg.search_penalty * weight
    if cfg.penalty_mode == "per_search":
        return max(0.0, 1.0 - cost * searches)
    return 1.0 - cost


def compute_reward(turns: list[str], answer: str, aliases: list[str], cfg: RewardConfig | None = None, *,
                   version: int = 0) -> Reward:
    """Reward of an episode whose assistant turns (decoded, tags included) are `turns`; `version` is the policy
    version the warm-up is measured in (the actor passes the engine's version when the episode ends)."""
    cfg = cfg or _DEFAULT
    image_searches = sum(turn_action(t) == "image" for t in turns[:-1])
    text_searches = sum(turn_action(t) == "text" for t in turns[:-1])
    predicted = last_answer(turns[-1]) if turns else None
    accuracy = float(answer_matches(predicted, answer, aliases, cfg.match))
    penalty = search_penalty_factor(bool(accuracy), image_searches + text_searches, cfg, version)
    fmt = format_score(turns, cfg)
    a = cfg.format_weight
    total = (1.0 - a) * accuracy * penalty + a * fmt
    return Reward(total=total, accuracy=accuracy, format=fmt, penalty=penalty,
                  image_searches=image_searches, text_searches=text_searches)


_DEFAULT = RewardConfig()
