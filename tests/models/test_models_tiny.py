"""The tiny model folder: loads through AutoProcessor/AutoModelForImageTextToText, 4 tokens per 56x56 image,
vision ids inside the vocab, mrope sections that fit the head, and both Qwen families."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from episode import prompts
from models.tiny import TinyModelConfig, build_tiny_model, mrope_section
from protocol.images import decode_image


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_mrope_section_fills_half_the_head(head_dim):
    sections = mrope_section(head_dim)
    assert sum(sections) == head_dim // 2 and len(sections) == 3 and min(sections) > 0
    if head_dim == 128:
        assert sections == [16, 24, 24]  # Qwen's own split


def test_folder_loads_with_auto_classes(small_tiny):
    processor = AutoProcessor.from_pretrained(small_tiny)
    model = AutoModelForImageTextToText.from_pretrained(small_tiny)
    config = AutoConfig.from_pretrained(small_tiny)
    vocab = len(processor.tokenizer)
    assert config.text_config.vocab_size == vocab
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert 0 <= getattr(config, name) < vocab
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert sum(config.text_config.rope_parameters["mrope_section"]) == config.text_config.hidden_size // 8
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 3e6
    info = json.loads((small_tiny / "config.json").read_text())
    assert info["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]


def test_a_56px_image_is_four_tokens_and_generation_runs(small_tiny, small_world):
    processor = AutoProcessor.from_pretrained(small_tiny)
    model = AutoModelForImageTextToText.from_pretrained(small_tiny).eval()
    row = small_world.questions[0]
    text = processor.apply_chat_template([prompts.first_user_message(row["question"])], tokenize=False,
                                         add_generation_prompt=True)
    enc = processor(text=[text], images=[decode_image(row["image"])], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((enc["input_ids"] == image_id).sum()) == 4
    assert enc["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert torch.equal(enc["mm_token_type_ids"][0].bool(), enc["input_ids"][0] == image_id)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4 or out[0, -1] == processor.tokenizer.eos_token_id


def test_a_big_image_is_shrunk_to_the_pixel_budget(small_tiny):
    from PIL import Image

    processor = AutoProcessor.from_pretrained(small_tiny)
    enc = processor.image_processor(images=[Image.new("RGB", (640, 480))], return_tensors="pt")
    t, h, w = enc["image_grid_thw"][0].tolist()
    assert t == 1 and h * w // 4 <= 4  # image_max_pixels = 56*56 keeps every thumbnail at <= 4 tokens


def test_qwen2_vl_family_builds_too(small_paths, tmp_path):
    from data.world import world_texts

    out = build_tiny_model(TinyModelConfig(family="qwen2_vl"), world_texts(small_paths), tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"


def test_same_seed_same_weights(small_paths, tmp_path):
    from safetensors.torch import load_file

    from data.world import world_texts

    a = build_tiny_model(TinyModelConfig(seed=1), world_texts(small_paths), tmp_path / "a")
    b = build_tiny_model(TinyModelConfig(seed=1), world_texts(small_paths), tmp_path / "b")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("bad", [
    dict(family="llama"), dict(hidden_size=130), dict(num_heads=4, num_kv_heads=3), dict(hidden_size=96, num_heads=8),
    dict(vision_hidden_size=130), dict(image_min_pixels=100), dict(image_min_pixels=6272, image_max_pixels=3136),
])
def test_bad_tiny_config_is_rejected(bad):
    with pytest.raises(ValueError):
        TinyModelConfig(**bad).validate()
