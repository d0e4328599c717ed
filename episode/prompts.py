"""Prompt texts and the tag vocabulary of the MMSearch-R1 episode protocol, in named formats.

Everything the model reads besides the question and the tool results lives here, so that the actors, the
warm-start episodes and the tokenizer trainer all agree on it. Plain strings: they work with any chat template.
A model folder records the format it was trained with (`FORMAT_FILE`); `EpisodeTokenizer.from_pretrained` reads it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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

# Workflow hints: a line after the question that imposes a workflow on the model, as MMSearch-R1 prompts its
# baselines (the RAG workflow; a direct answer). The evaluations' always_search / never_search modes show them
# (and force the actions besides); the warm start trains on some hinted episodes so the tiny model follows them.
HINTS: dict[str, str] = {
    "always_search": "search the image, then search the text, then answer.",
    "never_search": "answer without searching.",
}

# In-band text of a failed search (MMSearch-R1's wording): the model is told the tool failed, not that it found
# nothing, and reasons on without it.
SEARCH_ERROR = "There is an error encountered in performing search. Please reason with your own capabilities."

# In-band text when a search is refused because its limit is reached (actors.episode.on_search_over_limit=inform).
SEARCH_LIMIT = "The search limit is reached. Please reason with your own capabilities and give the final answer."

# The model folder file that names the prompt format a model was trained with (models/tiny.py writes it); a folder
# without one (any real checkpoint) gets DEFAULT_FORMAT.
FORMAT_FILE = "forage_prompt.json"


@dataclass(frozen=True)
class PromptFormat:
    """The fixed texts around the question and the tool results. `mmsearch_r1` instructs the model in words (real
    models need that); `compact` shows the question and the results alone: the tiny model learns the protocol
    from its warm start, and every instruction token it reads costs compute and sits between a result and the
    answer that must copy from it."""

    name: str
    question_prefix: str  # before the question, in the first user turn
    instruction: str  # after the question ("" = none)
    continue_instruction: str  # after </information> in a tool-result turn ("" = none)

    def first_user_text(self, question: str, hint: str | None = None) -> str:
        """Text that follows the question's image in the first user turn; `hint` names a workflow hint (HINTS)."""
        if hint is not None and hint not in HINTS:
            raise ValueError(f"unknown workflow hint {hint!r}; known: {sorted(HINTS)}")
        lines = [self.question_prefix + question, *([self.instruction] if self.instruction else []),
                 *([HINTS[hint]] if hint else [])]
        return "\n".join(lines)

    def first_user_message(self, question: str, hint: str | None = None) -> dict:
        """The first user turn in HF chat format: the question's image, then the question (and instruction, and
        the workflow hint if any)."""
        return {"role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": self.first_user_text(question, hint)}]}

    def info_close_text(self) -> str:
        """What ends a tool-result turn: </information> and the format's continue instruction."""
        return INFO_CLOSE + ("\n" + self.continue_instruction if self.continue_instruction else "")

    def information_message(self, results: list[tuple[str, str, bool]]) -> dict:
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
        parts.append({"type": "text", "text": self.info_close_text()})
        return {"role": "user", "content": parts}

    def notice_message(self, text: str) -> dict:
        """A tool-result user turn that carries a notice instead of hits (`SEARCH_ERROR`, `SEARCH_LIMIT`)."""
        return {"role": "user", "content": [{"type": "text", "text": INFO_OPEN + "\n" + text + "\n" + self.info_close_text()}]}

    def texts(self) -> list[str]:
        """The fixed texts every episode of this format shows (for tokenizer training)."""
        return [t for t in (self.question_prefix, self.instruction, self.continue_instruction, NO_RESULTS,
                            image_result_text(""), text_result_text("", ""), SEARCH_ERROR, SEARCH_LIMIT,
                            *HINTS.values()) if t]


MMSEARCH_R1 = PromptFormat("mmsearch_r1", question_prefix="question: ", instruction=INSTRUCTION,
                           continue_instruction=CONTINUE_INSTRUCTION)
COMPACT = PromptFormat("compact", question_prefix="", instruction="", continue_instruction="")
FORMATS: dict[str, PromptFormat] = {f.name: f for f in (MMSEARCH_R1, COMPACT)}
DEFAULT_FORMAT = MMSEARCH_R1


def prompt_format(name: str) -> PromptFormat:
    """The format called `name`; ValueError naming the known ones otherwise."""
    if name not in FORMATS:
        raise ValueError(f"unknown prompt format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name]


def format_of_model(model_dir: str | Path) -> PromptFormat:
    """The format recorded in a model folder's FORMAT_FILE, or DEFAULT_FORMAT when it has none."""
    record = Path(model_dir) / FORMAT_FILE
    if not record.is_file():
        return DEFAULT_FORMAT
    try:
        name = json.loads(record.read_text())["prompt"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{record}: expected {{\"prompt\": NAME}}: {exc}") from exc
    return prompt_format(name)


def write_format(model_dir: str | Path, fmt: PromptFormat) -> None:
    """Record `fmt` in a model folder (read back by `format_of_model`)."""
    (Path(model_dir) / FORMAT_FILE).write_text(json.dumps({"prompt": fmt.name}) + "\n")


def image_result_text(title: str) -> str:
    """Caption placed after each returned thumbnail inside <information>."""
    return f"title: {title}\n"


def text_result_text(title: str, text: str) -> str:
    """One text-search hit inside <information>."""
    return f"title: {title}\n{text}\n"


# The default format's messages, for callers that do not choose one.
first_user_text = DEFAULT_FORMAT.first_user_text
first_user_message = DEFAULT_FORMAT.first_user_message
information_message = DEFAULT_FORMAT.information_message
notice_message = DEFAULT_FORMAT.notice_message
