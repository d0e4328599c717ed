"""Builds a tiny Qwen2.5-VL (or Qwen2-VL) from config with a tokenizer trained on the world, saved as a normal HF
folder that transformers (AutoProcessor, AutoModelForImageTextToText) and vLLM load like any checkpoint.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    GenerationConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil, Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from episode import prompts
from models.tokenizer import (
    ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, CHAT_TEMPLATE, train_tokenizer,
)

log = logging.getLogger(__name__)

FAMILIES = ("qwen2_5_vl", "qwen2_vl")
PATCH_SIZE, MERGE_SIZE, TEMPORAL_PATCH_SIZE = 14, 2, 2


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the tiny model and its tokenizer; every field takes part in the build cache hash."""

    seed: int = 0
    family: str = "qwen2_5_vl"  # "qwen2_5_vl" | "qwen2_vl"
    vocab_size: int = 1024  # BPE target; the real vocabulary may stop short of it (see min_frequency)
    tokenizer_min_frequency: int = 24  # above any one name's count, so names split into shared pieces
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vision_depth: int = 2
    vision_hidden_size: int = 128
    vision_heads: int = 4
    vision_intermediate_size: int = 256
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    # Init std of all weights. HF's 0.02 left the 128-wide model unable to read images or copy names within a
    # CPU-minute of warm start; ~0.06-0.1 learns both several times faster (measured, see models/README.md).
    init_std: float = 0.06
    # Images are resized so their pixel count lies in [min, max]; 56*56 both ways gives every image 4 tokens.
    image_min_pixels: int = 56 * 56
    image_max_pixels: int = 56 * 56
    # The episode's prompt format (episode/prompts.py), recorded in the folder: compact for the tiny model, which
    # learns the protocol from its warm start rather than from instructions.
    prompt: str = "compact"

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}; known: {FAMILIES}")
        prompts.prompt_format(self.prompt)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                             f"num_kv_heads={self.num_kv_heads}: heads must divide hidden and kv heads divide heads")
        if (self.hidden_size // self.num_heads) % 8:
            raise ValueError(f"head_dim={self.hidden_size // self.num_heads} must be a multiple of 8 (mrope sections)")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(f"vision_hidden_size={self.vision_hidden_size} not divisible by "
                             f"vision_heads={self.vision_heads}")
        unit = (PATCH_SIZE * MERGE_SIZE) ** 2
        if not unit <= self.image_min_pixels <= self.image_max_pixels:
            raise ValueError(f"need {unit} <= image_min_pixels={self.image_min_pixels} <= "
                             f"image_max_pixels={self.image_max_pixels}")


def mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the rotary half-dimension in Qwen's 1:1.5:1.5 proportion (16/24/24 at 128)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def model_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen2_5_VLConfig | Qwen2VLConfig:
    """The HF config for `cfg` with the vision token ids of `tokenizer` (inside the small vocab)."""
    cfg.validate()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START,
                                                          VISION_END)}
    head_dim = cfg.hidden_size // cfg.num_heads
    text = dict(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, max_window_layers=cfg.num_layers,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                         "mrope_section": mrope_section(head_dim)},
        bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
        initializer_range=cfg.init_std,
    )
    common = dict(image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
                  vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
                  tie_word_embeddings=True)
    if cfg.family == "qwen2_5_vl":
        vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden_size,
                      intermediate_size=cfg.vision_intermediate_size, num_heads=cfg.vision_heads,
                      out_hidden_size=cfg.hidden_size, patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE,
                      temporal_patch_size=TEMPORAL_PATCH_SIZE,
                      # One window covers a 56x56 image (2x2 merged tokens); the last block attends globally.
                      window_size=PATCH_SIZE * MERGE_SIZE * 2, fullatt_block_indexes=[cfg.vision_depth - 1],
                      initializer_range=cfg.init_std)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    vision = dict(depth=cfg.vision_depth, embed_dim=cfg.vision_hidden_size, hidden_size=cfg.hidden_size,
                  mlp_ratio=cfg.vision_intermediate_size // cfg.vision_hidden_size, num_heads=cfg.vision_heads,
                  patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
                  initializer_range=cfg.init_std)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **common)


def make_processor(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast
                   ) -> Qwen2_5_VLProcessor | Qwen2VLProcessor:
    """Processor (image processor + tokenizer + chat template) for the tiny model."""
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": cfg.image_min_pixels, "longest_edge": cfg.image_max_pixels},
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE)
    # The processor class insists on a video processor; forage never sends video.
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": cfg.image_min_pixels, "longest_edge": cfg.image_max_pixels},
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE)
    cls = Qwen2_5_VLProcessor if cfg.family == "qwen2_5_vl" else Qwen2VLProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
               chat_template=CHAT_TEMPLATE)


def build_tiny_model(cfg: TinyModelConfig, texts: Iterable[str], out_dir: Path | str,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Trains the tokenizer on `texts`, initialises the model from `cfg.seed`, and saves everything to `out_dir`."""
    cfg.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fmt = prompts.prompt_format(cfg.prompt)
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size, min_frequency=cfg.tokenizer_min_frequency,
                                model_max_length=cfg.max_position_embeddings, fmt=fmt)
    config = model_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    cls = Qwen2_5_VLForConditionalGeneration if cfg.family == "qwen2_5_vl" else Qwen2VLForConditionalGeneration
    model = cls(config).to(dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=[config.text_config.eos_token_id], pad_token_id=config.text_config.pad_token_id,
        bos_token_id=config.text_config.bos_token_id, do_sample=False)
    model.save_pretrained(out_dir)
    make_processor(cfg, tokenizer).save_pretrained(out_dir)
    prompts.write_format(out_dir, fmt)
    log.info("built %s: %d parameters, vocab %d -> %s", cfg.family, sum(p.numel() for p in model.parameters()),
             len(tokenizer), out_dir)
    return out_dir
