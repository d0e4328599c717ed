"""Test-only references for the warm start: oracle episodes rendered with the processor's whole chat template
(`encode_episode`: an independent rendering the tests compare the piecewise, actor-exact tokenisation of
episode/oracle.py against), and a greedy multi-turn evaluation of a warm-started model with simulated tools
(`evaluate_warmstart`, also handy in probes). The warm start itself is the learner's SFT (learner/sft.py).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from data.oracle import OracleConfig
from data.world import KINDS, WorldPaths, load_world
from episode import prompts
from episode.answers import answer_matches
from episode.oracle import OracleEpisode, SearchHit, episode_messages
from episode.turns import ORACLE_TURN_RE
from models.tokenizer import IM_END, IM_START
from protocol.images import decode_image

log = logging.getLogger(__name__)


@dataclass
class EncodedEpisode:
    """One rendered conversation: token ids, the assistant-token loss mask and the vision inputs."""

    input_ids: torch.Tensor  # (T,) int64
    loss_mask: torch.Tensor  # (T,) bool: True on assistant content and its <|im_end|>
    mm_token_type_ids: torch.Tensor  # (T,) int64: 1 on image tokens
    pixel_values: torch.Tensor  # (patches, C*T*P*P)
    image_grid_thw: torch.Tensor  # (images, 3)


def assistant_mask(input_ids: list[int], im_start: int, im_end: int, assistant_header: list[int]) -> list[bool]:
    """True on the tokens of each assistant turn's content and its closing <|im_end|> (what the model generates)."""
    mask = [False] * len(input_ids)
    i, n, h = 0, len(input_ids), len(assistant_header)
    while i < n:
        if input_ids[i] == im_start and input_ids[i + 1: i + 1 + h] == assistant_header:
            j = i + 1 + h
            while j < n and input_ids[j] != im_end:
                mask[j] = True
                j += 1
            if j < n:
                mask[j] = True
            i = j
        i += 1
    return mask


def encode_messages(processor, messages: list[dict], images: list[bytes]) -> EncodedEpisode:
    """Renders `messages` with the chat template and tokenises it with `images` (PNG bytes, in order)."""
    text = processor.apply_chat_template(messages, tokenize=False)
    enc = processor(text=[text], images=[decode_image(b) for b in images], return_tensors="pt")
    ids = enc["input_ids"][0]
    tok = processor.tokenizer
    header = tok.encode("assistant\n", add_special_tokens=False)
    mask = assistant_mask(ids.tolist(), tok.convert_tokens_to_ids(IM_START), tok.convert_tokens_to_ids(IM_END), header)
    if "mm_token_type_ids" in enc:
        mm = enc["mm_token_type_ids"][0]
    else:
        mm = (ids == processor.image_token_id).long()
    return EncodedEpisode(input_ids=ids, loss_mask=torch.tensor(mask), mm_token_type_ids=mm.long(),
                          pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])


def encode_episode(processor, episode: OracleEpisode,
                   fmt: prompts.PromptFormat = prompts.DEFAULT_FORMAT) -> EncodedEpisode:
    messages, images = episode_messages(episode, fmt)
    return encode_messages(processor, messages, images)


def collate(batch: list[EncodedEpisode], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for a training forward; `labels` are -100 off the loss mask."""
    length = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    mm = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[i, :n] = e.input_ids
        attention_mask[i, :n] = 1
        mm[i, :n] = e.mm_token_type_ids
        labels[i, :n] = torch.where(e.loss_mask, e.input_ids, torch.full_like(e.input_ids, -100))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm, "labels": labels,
            "pixel_values": torch.cat([e.pixel_values for e in batch]),
            "image_grid_thw": torch.cat([e.image_grid_thw for e in batch])}


def sft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the assistant tokens of the batch."""
    labels = batch["labels"]
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    logits = out.logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: greedy multi-turn episodes with simulated tools.

def evaluate_warmstart(model_dir: Path | str, world_paths: WorldPaths, split: str = "test", per_kind: int = 16,
                       max_turns: int = 4, max_new_tokens: int = 48, oracle_cfg: OracleConfig | None = None
                       ) -> dict:
    """Greedy (transformers generate) multi-turn episodes on `per_kind` questions of each kind of `split`.

    Tools are the local search backends in this process (what the tool servers run), with the oracle's settings
    (`oracle_cfg`: hits per search, snippets). Returns rates overall and per kind: format (every turn
    `<reason>..</reason>` + one action, ends with an answer), accuracy, search rate and mean searches.
    """
    from tool_servers.backends.local_image import LocalImageSearch
    from tool_servers.backends.local_text import LocalTextSearch

    oracle_cfg = oracle_cfg or OracleConfig()
    image_tool = LocalImageSearch(world_paths.image_corpus, top_k=oracle_cfg.image_results)
    text_tool = LocalTextSearch(world_paths.text_corpus, top_k=oracle_cfg.text_results,
                                max_chars=oracle_cfg.text_chars, snippet_sentences=oracle_cfg.snippet_sentences)
    fmt = prompts.format_of_model(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = processor.tokenizer
    stop_ids = [tok.convert_tokens_to_ids(t) for t in (*prompts.TURN_STOPS, IM_END)]
    world = load_world(world_paths)
    rows: list[dict] = []
    for kind in KINDS:
        pool = [q for q in world.questions if q["split"] == split and q["kind"] == kind]
        rows.extend(pool[:per_kind])
    if not rows:
        raise ValueError(f"no questions in split {split!r}")
    results = []
    start = time.monotonic()
    for row in rows:
        messages = [fmt.first_user_message(row["question"])]
        images = [row["image"]]
        well_formed, searches, prediction = True, 0, None
        for _ in range(max_turns):
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            enc = processor(text=[text], images=[decode_image(b) for b in images], return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                     pad_token_id=tok.pad_token_id)
            turn = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn}]})
            match = ORACLE_TURN_RE.match(turn)
            if match is None:
                well_formed = False
                break
            if match.group("answer") is not None:
                prediction = match.group("answer")
                break
            searches += 1
            if match.group("image") is not None:
                hits = [SearchHit(i.title, "", i.image) for i in image_tool.search_batch([{"image": row["image"]}])[0]]
            else:
                hits = [SearchHit(i.title, i.text, None) for i in text_tool.search(match.group("query"))]
            messages.append(fmt.information_message([(h.title, h.text, h.image is not None) for h in hits]))
            images.extend(h.image for h in hits if h.image is not None)
        results.append({"kind": row["kind"], "format": well_formed and prediction is not None,
                        "correct": prediction is not None and answer_matches(prediction, row["answer"], row["aliases"]),
                        "searches": searches})
    report: dict = {"questions": len(results), "seconds": time.monotonic() - start}
    for name, subset in [("all", results), *[(k, [r for r in results if r["kind"] == k]) for k in KINDS]]:
        if not subset:
            continue
        report[f"format_rate/{name}"] = float(np.mean([r["format"] for r in subset]))
        report[f"accuracy/{name}"] = float(np.mean([r["correct"] for r in subset]))
        report[f"search_rate/{name}"] = float(np.mean([r["searches"] > 0 for r in subset]))
        report[f"mean_searches/{name}"] = float(np.mean([r["searches"] for r in subset]))
    return report
