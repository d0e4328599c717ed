"""The world tokenizer: small vocab, Qwen specials and every tag as one token, ChatML template with images."""
from __future__ import annotations

from itertools import chain

import numpy as np
import pytest
from jinja2.exceptions import TemplateError

from episode import prompts
from models.tokenizer import MAX_VOCAB, SPECIAL_TOKENS, check_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok(small_paths, small_world):
    from data.oracle import oracle_texts
    from data.world import world_texts

    return train_tokenizer(chain(world_texts(small_paths), oracle_texts(small_world, seed=0)))


def test_vocab_is_small_and_specials_come_first(tok):
    assert 300 <= len(tok) <= MAX_VOCAB
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_each_tag_is_one_token_and_survives_decode(tok):
    for tag in prompts.TAGS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
    text = "<reason>the top result is zorblat.</reason><answer> zorblat </answer>"
    ids = tok.encode("<|im_start|>assistant\n" + text + "<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n" + text


def test_names_split_into_pieces_shared_with_other_names(small_paths, small_world):
    # No name may be a token of its own, and with random names in the training text (as models/ensure.py trains
    # it) names become a few syllable pieces: held-out names are made of pieces the model saw in training.
    from data.names import name_texts
    from data.world import world_texts

    tok = train_tokenizer(chain(world_texts(small_paths), name_texts(np.random.default_rng(0), 3000)))
    fresh_pieces = set()  # the pieces of the stand-in names the warm start copies
    for line in name_texts(np.random.default_rng(1), 100):
        for name in line.split():
            fresh_pieces.update(tok.encode(" " + name, add_special_tokens=False))
    test_names = [e.name for e in small_world.entities.values() if e.split == "test"]
    lengths = [len(tok.encode(" " + name, add_special_tokens=False)) for name in test_names]
    assert min(lengths) >= 2 and np.mean(lengths) <= 3.2, lengths
    covered = [all(i in fresh_pieces for i in tok.encode(" " + n, add_special_tokens=False)) for n in test_names]
    assert sum(covered) / len(covered) >= 0.75


def test_same_texts_train_the_same_tokenizer(small_paths):
    from data.world import world_texts

    a = train_tokenizer(world_texts(small_paths))
    b = train_tokenizer(world_texts(small_paths))
    assert a.get_vocab() == b.get_vocab()


def test_chat_template_renders_image_parts_and_generation_prompt(tok):
    messages = [prompts.first_user_message("what colour is the object in the image?"),
                {"role": "assistant", "content": "<reason>x.</reason><search><img></search>"},
                prompts.information_message([("zorblat", "", True), ("quenby", "", True)])]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 3
    assert text.startswith("<|im_start|>user\n<|vision_start|>")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\n<reason>x.</reason><search><img></search><|im_end|>\n" in text
    without = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without.endswith("<|im_end|>\n") and not without.endswith("assistant\n")


def test_chat_template_accepts_openai_style_image_parts(tok):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                             {"type": "text", "text": "hi"}]}]
    assert "<|vision_start|><|image_pad|><|vision_end|>hi" in tok.apply_chat_template(messages, tokenize=False)


def test_chat_template_rejects_unknown_parts(tok):
    with pytest.raises(TemplateError, match="unsupported content part"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}], tokenize=False)


def test_bad_vocab_size_is_rejected(small_paths):
    from data.world import world_texts

    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(world_texts(small_paths), vocab_size=MAX_VOCAB + 1)


def test_check_tokenizer_catches_a_missing_tag(tok):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    check_tokenizer(tok)
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))  # no specials, no tags
    with pytest.raises(ValueError, match="expected 1"):
        check_tokenizer(bare)
