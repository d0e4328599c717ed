"""Turn parsing of the MMSearch-R1 episode protocol (pure): what a generated assistant turn asks for, and the answer
it gives. Actors parse every turn with it; the reward and the evaluations read answers with it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from episode import prompts

IMAGE_SEARCH, TEXT_SEARCH = "image_search", "text_search"  # the two tools, as tool servers name them
ANSWER = "answer"
ActionKind = Literal["answer", "image_search", "text_search", "invalid_call", "none"]

# What a forced turn appends after the model's reason (actors.episode.run_episode's `workflow`): the image call
# whole; the opening tag of a text search or an answer, whose content the model then writes.
FORCED_ACTIONS: dict[str, str] = {IMAGE_SEARCH: prompts.IMAGE_SEARCH_CALL, TEXT_SEARCH: prompts.TEXT_SEARCH_OPEN,
                                  ANSWER: prompts.ANSWER_OPEN}

# A turn exactly in the oracle's shape (one reason, then one action, nothing else around them): how the warm start's
# evaluations count a well-formatted greedy turn.
ORACLE_TURN_RE = re.compile(
    r"^<reason>[^<]+</reason>(?:(?P<image><search><img></search>)|<text_search>(?P<query>[^<]+)</text_search>"
    r"|<answer>(?P<answer>[^<]+)</answer>)$")


@dataclass(frozen=True)
class TurnAction:
    """What a generated turn asks for: the final answer, a search (with its query), or nothing usable.
    `error` names why a call is invalid: orphan_close, nested_tags, bad_image_call, empty_query."""

    kind: ActionKind
    query: str = ""
    answer: str | None = None
    error: str = ""


def _action_body(text: str, open_tag: str, close_tag: str) -> tuple[str | None, str]:
    """(inner text of the call that ends `text`, error). The call is the part after the previous `close_tag`;
    it must hold exactly one `open_tag` and no other tag of the protocol inside."""
    body = text[:-len(close_tag)]
    previous = body.rfind(close_tag)
    segment = body[previous + len(close_tag):] if previous >= 0 else body
    opens = segment.count(open_tag)
    if opens == 0:
        return None, "orphan_close"
    if opens > 1:
        return None, "nested_tags"
    inner = segment[segment.index(open_tag) + len(open_tag):]
    return inner, ""


def _has_tag(inner: str, allowed: tuple[str, ...] = ()) -> bool:
    return any(tag in inner for tag in prompts.TAGS if tag not in allowed)


def parse_turn(text: str) -> TurnAction:
    """Classify a decoded turn by how it ends (generation stops right after a closing tag). Malformed calls
    (a close without its open, nested or foreign tags inside the call, an image call without exactly <img>, an
    empty query) are `invalid_call` with the reason in `error`."""
    stripped = text.rstrip()
    if stripped.endswith(prompts.ANSWER_CLOSE):
        inner, error = _action_body(stripped, prompts.ANSWER_OPEN, prompts.ANSWER_CLOSE)
        if inner is not None and _has_tag(inner):
            error = "nested_tags"
        return TurnAction("answer", answer=inner) if not error else TurnAction("invalid_call", error=error)
    if stripped.endswith(prompts.IMAGE_SEARCH_CLOSE):
        inner, error = _action_body(stripped, prompts.IMAGE_SEARCH_OPEN, prompts.IMAGE_SEARCH_CLOSE)
        if inner is not None and inner.strip() != prompts.IMAGE_TAG:
            error = "nested_tags" if _has_tag(inner, (prompts.IMAGE_TAG,)) else "bad_image_call"
        return TurnAction(IMAGE_SEARCH) if not error else TurnAction("invalid_call", error=error)
    if stripped.endswith(prompts.TEXT_SEARCH_CLOSE):
        inner, error = _action_body(stripped, prompts.TEXT_SEARCH_OPEN, prompts.TEXT_SEARCH_CLOSE)
        if inner is not None:
            if _has_tag(inner):
                error = "nested_tags"
            elif not inner.strip():
                error = "empty_query"
        return TurnAction(TEXT_SEARCH, query=inner.strip()) if not error else TurnAction("invalid_call", error=error)
    return TurnAction("none")


def last_answer(turn: str) -> str | None:
    """Content of the last complete <answer>...</answer> in `turn`, or None."""
    end = turn.rfind(prompts.ANSWER_CLOSE)
    if end < 0:
        return None
    start = turn.rfind(prompts.ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    return turn[start + len(prompts.ANSWER_OPEN):end]
