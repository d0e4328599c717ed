"""Prompt texts and the tag vocabulary of the MMSearch-R1 episode protocol.

Everything the model reads besides the question and the tool results lives here, so that the actors, the
warm-start episodes and the tokenizer trainer all agree on it. Plain strings: they work with any chat template.
"""
from __future__ import annotations

# Tags the policy emits. Each is one token in the tiny model's vocabulary (models/tokenizer.py adds them).
REASON_OPEN, REASON_CLOSE = "<reason>", "</reason>"
IMAGE_SEARCH_OPEN, IMAGE_SEARCH_CLOSE, IMAGE_TAG = "<search>", "</search>", "<img>"
TEXT_SEARCH_OPEN, TEXT_SEARCH_CLOSE = "<text_search>", "</text_search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"

IMAGE_SEARCH_CALL = IMAGE_SEARCH_OPEN + IMAGE_TAG + IMAGE_SEARCH_CLOSE

TAGS: tuple[str, ...] = (
    REASON_OPEN, REASON_CLOSE, IMAGE_SEARCH_OPEN, IMAGE_SEARCH_CLOSE, IMAGE_TAG,
    TEXT_SEARCH_OPEN, TEXT_SEARCH_CLOSE, ANSWER_OPEN, ANSWER_CLOSE, INFO_OPEN, INFO_CLOSE,
)

# A generated turn ends at the first of these (the engine stops on them; they stay in the output).
TURN_STOPS: tuple[str, ...] = (IMAGE_SEARCH_CLOSE, TEXT_SEARCH_CLOSE, ANSWER_CLOSE)

INSTRUCTION = (
    "answer the question about the image. first think inside <reason> and </reason>. "
    "if you must identify the object in the image, write <search><img></search>. "
    "if you need a fact, write <text_search> a query </text_search>. "
    "give the final answer inside <answer> and </answer>."
)

CONTINUE_INSTRUCTION = (
    "use the information above. think inside <reason> and </reason>, then search again "
    "or give the final answer inside <answer> and </answer>."
)

NO_RESULTS = "no results"


def first_user_text(question: str) -> str:
    """Text that follows the question's image in the first user turn."""
    return f"question: {question}\n{INSTRUCTION}"


def image_result_text(title: str) -> str:
    """Caption placed after each returned thumbnail inside <information>."""
    return f"title: {title}\n"


def text_result_text(title: str, text: str) -> str:
    """One text-search hit inside <information>."""
    return f"title: {title}\n{text}\n"


def first_user_message(question: str) -> dict:
    """The first user turn in HF chat format: the question's image, then the question and the instruction."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": first_user_text(question)}]}


def information_message(results: list[tuple[str, str, bool]]) -> dict:
    """A tool-result user turn in HF chat format.

    `results` holds (title, text, has_image) per hit, in order; a hit with an image gets an image part before
    its title (the caller passes the images themselves to the engine in the same order). An empty list means
    the tool found nothing (or failed), which the model is told in words.
    """
    parts: list[dict] = [{"type": "text", "text": INFO_OPEN + "\n"}]
    if not results:
        parts.append({"type": "text", "text": NO_RESULTS + "\n"})
    for title, text, has_image in results:
        if has_image:
            parts.append({"type": "image"})
            parts.append({"type": "text", "text": image_result_text(title)})
        else:
            parts.append({"type": "text", "text": text_result_text(title, text)})
    parts.append({"type": "text", "text": INFO_CLOSE + "\n" + CONTINUE_INSTRUCTION})
    return {"role": "user", "content": parts}


# In-band text of a failed search (MMSearch-R1's wording): the model is told the tool failed, not that it found
# nothing, and reasons on without it.
SEARCH_ERROR = "There is an error encountered in performing search. Please reason with your own capabilities."

# In-band text when a search is refused because its limit is reached (actors.episode.on_search_over_limit=inform).
SEARCH_LIMIT = "The search limit is reached. Please reason with your own capabilities and give the final answer."


def notice_message(text: str) -> dict:
    """A tool-result user turn that carries a notice instead of hits (`SEARCH_ERROR`, `SEARCH_LIMIT`)."""
    parts = [{"type": "text", "text": INFO_OPEN + "\n" + text + "\n" + INFO_CLOSE + "\n" + CONTINUE_INSTRUCTION}]
    return {"role": "user", "content": parts}
