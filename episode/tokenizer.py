"""Token-in/token-out tokenisation of episodes: the token ids of each prompt piece an episode appends (first prompt,
tool-result continuation), rendered with the model's own chat template, each piece tokenised on its own and
appended, so generated tokens are never decoded and re-encoded; and how the engine expands image placeholders.
Actors record trajectories with it; the warm start's oracle trajectories are tokenised with it (episode/oracle.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from episode import prompts

_SENTINEL = "\u2063forage-turn-end\u2063"  # stands in for an assistant turn's content when rendering the template


class EpisodeTokenizer:
    """Token ids of the prompt pieces an episode appends, rendered with the model's own chat template."""

    def __init__(self, processor: Any, prompt: prompts.PromptFormat = prompts.DEFAULT_FORMAT) -> None:
        self.processor = processor
        self.prompt = prompt
        self.tokenizer = processor.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.image_pad_id = vocab["<|image_pad|>"]
        # Vision placeholders the policy must not emit: a later prompt would read them as images, and the learner
        # rejects generated placeholders. They are not banned in sampling (that would make the behaviour
        # distribution differ from the policy's); a turn is cut just before one and the episode ends.
        self.forbidden_ids = {vocab[t] for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>",
                                                 "<|video_pad|>") if t in vocab}
        self.stop_token_ids: list[int] = []
        self.stop_strings: list[str] = []
        for tag in prompts.TURN_STOPS:  # one-token tags stop on the id (exact); others on the string
            ids = self.tokenizer.encode(tag, add_special_tokens=False)
            (self.stop_token_ids.extend(ids) if len(ids) == 1 else self.stop_strings.append(tag))
        for tok in ("<|im_end|>", self.tokenizer.eos_token):
            if tok and tok in vocab and vocab[tok] not in self.stop_token_ids:
                self.stop_token_ids.append(vocab[tok])
        # Where a forced turn's reason ends (actors.episode.run_episode's `workflow`): the same rule as the stops.
        reason_close = self.tokenizer.encode(prompts.REASON_CLOSE, add_special_tokens=False)
        self.reason_stop_ids = reason_close if len(reason_close) == 1 else []
        self.reason_stop_strings = [] if len(reason_close) == 1 else [prompts.REASON_CLOSE]
        image_processor = processor.image_processor
        self._merge = int(getattr(image_processor, "merge_size", 1)) ** 2

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> "EpisodeTokenizer":
        """The model folder's processor, with the prompt format the folder records (prompts.format_of_model)."""
        from transformers import AutoProcessor

        return cls(AutoProcessor.from_pretrained(str(model_path)), prompts.format_of_model(model_path))

    def _encode(self, text: str, images: int, what: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        found = ids.count(self.image_pad_id)
        if found != images:
            raise ValueError(f"{what}: {found} image placeholders for {images} images in {text!r}")
        return ids

    def first_prompt(self, question: str, hint: str | None = None) -> list[int]:
        """The first user turn (with workflow `hint`, prompts.HINTS, if given) plus the generation prompt, with one
        placeholder for the question's image."""
        text = self.processor.apply_chat_template([self.prompt.first_user_message(question, hint)], tokenize=False,
                                                  add_generation_prompt=True)
        return self._encode(text, 1, "first prompt")

    def text_prompt(self, message: dict) -> list[int]:
        """A first user turn without images (`message` in HF chat format) plus the generation prompt."""
        text = self.processor.apply_chat_template([message], tokenize=False, add_generation_prompt=True)
        return self._encode(text, 0, "text prompt")

    def continuation(self, results: list[tuple[str, str, bool]]) -> list[int]:
        """Tokens that close the assistant turn, then the <information> user turn and the generation prompt."""
        return self.continuation_with(self.prompt.information_message(results),
                                      sum(has_image for _, _, has_image in results))

    def continuation_with(self, message: dict, images: int = 0) -> list[int]:
        """Tokens that close the assistant turn, then the user turn `message` (holding `images` image parts) and
        the generation prompt, rendered by the chat template after a stand-in assistant turn."""
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}, message]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if text.count(_SENTINEL) != 1:
            raise ValueError(f"chat template rendered the assistant turn {text.count(_SENTINEL)} times")
        suffix = text[text.index(_SENTINEL) + len(_SENTINEL):]
        return self._encode(suffix, images, "tool-result turn")

    def image_tokens(self, image: Image.Image) -> int:
        """Placeholder tokens the engine will expand one image into (used to budget max_total_tokens)."""
        return self.image_tokens_of_size(image.width, image.height)

    def image_tokens_of_size(self, width: int, height: int) -> int:
        """`image_tokens` of an image of that size (read from its header: nothing decoded)."""
        counter = getattr(self.processor.image_processor, "get_number_of_image_patches", None)
        if counter is None:
            return 1
        return int(counter(height, width, {})) // self._merge

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def expand_placeholders(ids: list[int], image_pad_id: int, counts: list[int]) -> list[int]:
    """`ids` with the k-th `image_pad_id` repeated counts[k] times, as the engine expands each image's placeholder."""
    out: list[int] = []
    k = 0
    for token in ids:
        if token == image_pad_id:
            if k >= len(counts):
                raise ValueError(f"more image placeholders than images ({len(counts)})")
            out.extend([token] * counts[k])
            k += 1
        else:
            out.append(token)
    if k != len(counts):
        raise ValueError(f"{k} image placeholders for {len(counts)} images")
    return out
