"""A small byte-level BPE tokenizer trained on the world's own text, with Qwen's special tokens, each episode tag
as one token, and a ChatML chat template that renders image parts the way Qwen2-VL/Qwen2.5-VL do.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from episode import prompts

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
# Order fixes their ids (0..6): the model config refers to them by id.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
MAX_VOCAB = 4096

# ChatML like Qwen2-VL's template, without the default system prompt (tokens are compute on a tiny model).
# An image part (also OpenAI-style image_url, as vLLM passes them) becomes one vision placeholder that the
# processor expands to the image's token count.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- part['text'] -}}"
    "{%- else -%}"
    "{{- raise_exception('unsupported content part type: ' + part['type']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)


def prompt_texts(fmt: prompts.PromptFormat = prompts.DEFAULT_FORMAT) -> list[str]:
    """Fixed texts every episode of format `fmt` shows (instructions, result captions, chat roles)."""
    return [*fmt.texts(), "system\n", "user\n", "assistant\n"]


def _training_stream(texts: Iterable[str], prompt_repeats: int, fmt: prompts.PromptFormat) -> Iterator[str]:
    yield from texts
    # The prompts are in every episode, so weight them like the frequent text they are.
    for _ in range(prompt_repeats):
        yield from prompt_texts(fmt)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 24,
                    prompt_repeats: int = 50, model_max_length: int = 4096,
                    fmt: prompts.PromptFormat = prompts.DEFAULT_FORMAT) -> PreTrainedTokenizerFast:
    """Trains the BPE on `texts` (plus the prompt texts) and wraps it as a Qwen-compatible fast tokenizer.

    `min_frequency` is above the number of times any one entity name occurs in the world, so no name becomes a
    token of its own: names split into syllable pieces shared with other (and unseen, held-out) names, which the
    model can learn to copy.
    """
    if not 300 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size={vocab_size} must be in [300, {MAX_VOCAB}] (256 bytes + specials + merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(prompts.TAGS), min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator(_training_stream(texts, prompt_repeats, fmt), trainer)
    # Tags are ordinary (non-special) added tokens: matched whole before BPE, and kept by decode(skip_special...).
    tok.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in prompts.TAGS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT, chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    check_tokenizer(fast)
    return fast


def check_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raises ValueError unless every special token and tag is a single token and the vocab is small."""
    if len(tokenizer) > MAX_VOCAB:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than {MAX_VOCAB}")
    for token in (*SPECIAL_TOKENS, *prompts.TAGS):
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{token!r} encodes to {len(ids)} tokens {ids}, expected 1")


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Id of each Qwen special token, by token text."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
