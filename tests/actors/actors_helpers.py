"""Helpers for the actors' tests: a tiny model from models.tiny taught the episode format in a few seconds, images,
a scripted fake engine and fake tool clients.

`teach_episode_format` runs a short SFT on scripted image -> text -> answer episodes so that the random-init model
emits the tags and real multi-turn, multi-image episodes happen, while the free text stays high-entropy (so the
log-prob comparisons are not between numbers near zero).
"""
from __future__ import annotations

import asyncio
import random
from pathlib import Path

import numpy as np
import torch
import zmq
import zmq.asyncio
from PIL import Image

from actors.engine import TurnOutput, TurnRequest
from episode import prompts
from protocol import (LearnerInbound, NamedArray, ToolError, ToolItem, ToolReply, WeightBucket, decode, encode,
                      to_ndarray)
from protocol.images import encode_png
from protocol.sockets import bind, configure

WORDS = ("red blue green round square star circle shape colour name fact town river built year tall "
         "small large object picture animal plant stone metal wood glass old new north south east west").split()
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def corpus(lines: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(lines)]


def build_model(out_dir: Path, family: str = "qwen2_5_vl", prompt: str = "compact") -> Path:
    """A random-init tiny model (models.tiny) with a tokenizer trained on WORDS, in the prompt format `prompt`
    (compact, the tiny model's default; teach_episode_format's scripted episodes are in mmsearch_r1)."""
    from models.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(TinyModelConfig(family=family, vocab_size=400, tokenizer_min_frequency=2,
                                            prompt=prompt),
                            corpus(), out_dir)


def solid_image(colour: tuple[int, int, int], size: int = 56) -> Image.Image:
    """A coloured square on a grey background."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    img.paste(Image.new("RGB", (size // 2, size // 2), colour), (size // 4, size // 4))
    return img


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + " "


def scripted_episode(rng: random.Random) -> list[dict]:
    """Messages of an image-search -> text-search -> answer episode (two images: question, one thumbnail)."""
    return [
        prompts.first_user_message(_words(rng, 2, 4).strip()),
        {"role": "assistant", "content": prompts.REASON_OPEN + _words(rng, 1, 3) + prompts.REASON_CLOSE
         + prompts.IMAGE_SEARCH_CALL},
        prompts.information_message([(_words(rng, 1, 2).strip(), "", True)]),
        {"role": "assistant", "content": prompts.REASON_OPEN + _words(rng, 1, 3) + prompts.REASON_CLOSE
         + prompts.TEXT_SEARCH_OPEN + _words(rng, 1, 2) + prompts.TEXT_SEARCH_CLOSE},
        prompts.information_message([(_words(rng, 1, 2).strip(), _words(rng, 3, 5), False)]),
        {"role": "assistant", "content": prompts.REASON_OPEN + _words(rng, 1, 3) + prompts.REASON_CLOSE
         + prompts.ANSWER_OPEN + _words(rng, 1, 1) + prompts.ANSWER_CLOSE},
    ]


def teach_episode_format(model_dir: Path, steps: int = 300, lr: float = 3e-3, seed: int = 0) -> dict[str, float]:
    """Short SFT of the model in `model_dir` on scripted episodes (assistant tokens only); saved in place."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from warmstart_reference import encode_messages, sft_loss

    torch.manual_seed(seed)
    rng = random.Random(seed)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        images = [encode_png(solid_image(rng.choice(COLOURS))) for _ in range(2)]
        enc = encode_messages(processor, scripted_episode(rng), images)
        labels = torch.where(enc.loss_mask, enc.input_ids, torch.full_like(enc.input_ids, -100))
        batch = {"input_ids": enc.input_ids[None], "attention_mask": torch.ones_like(enc.input_ids)[None],
                 "mm_token_type_ids": enc.mm_token_type_ids[None], "labels": labels[None],
                 "pixel_values": enc.pixel_values, "image_grid_thw": enc.image_grid_thw}
        loss = sft_loss(model, batch)
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    model.save_pretrained(model_dir)
    return {"first_loss": losses[0], "last_loss": sum(losses[-20:]) / min(20, len(losses))}


class ScriptedEngine:
    """A fake engine: replies with scripted turns, expands each image placeholder to `image_tokens` ids like vLLM,
    and records every request. Log-probs and versions are made up but distinct per token."""

    def __init__(self, turns: list[list[int]], image_pad_id: int, image_tokens: int = 4, version: int = 0,
                 finish_reasons: list[str] | None = None) -> None:
        self.turns = list(turns)
        self.image_pad_id = image_pad_id
        self.image_tokens = image_tokens
        self.version = version
        self.finish_reasons = list(finish_reasons or [])
        self.requests: list[TurnRequest] = []
        self.outputs: list[TurnOutput] = []

    async def generate(self, request: TurnRequest) -> TurnOutput:
        self.requests.append(request)
        if request.prompt_token_ids.count(self.image_pad_id) != len(request.images):
            raise AssertionError("placeholders and images differ in number")
        expanded: list[int] = []
        for t in request.prompt_token_ids:
            expanded.extend([t] * (self.image_tokens if t == self.image_pad_id else 1))
        tokens = self.turns.pop(0)[:request.max_tokens]
        reason = self.finish_reasons.pop(0) if self.finish_reasons else "stop"
        out = TurnOutput(prompt_token_ids=expanded, token_ids=list(tokens),
                         logprobs=[-0.01 * (i + 1) for i in range(len(tokens))],
                         versions=[self.version] * len(tokens), finish_reason=reason)
        self.outputs.append(out)
        return out


class FakeTools:
    """Tool clients for both tools: canned replies, a ToolCallError(`fail_code`) for tools listed in `fail`, no hits
    for tools in `empty`, an error reply (ok=False, `reply_code`) for tools in `error_reply`."""

    def __init__(self, thumbnails: int = 2, fail: tuple[str, ...] = (), empty: tuple[str, ...] = (),
                 error_reply: tuple[str, ...] = (), fail_code: str = "backend_error",
                 reply_code: str = "timeout") -> None:
        self.thumbnails = thumbnails
        self.fail = fail
        self.empty = empty
        self.error_reply = error_reply
        self.fail_code = fail_code
        self.reply_code = reply_code
        self.calls: list[tuple[str, dict]] = []

    async def call(self, tool: str, args: dict, deadline_s: float | None = None) -> ToolReply:
        from tool_servers.client import ToolCallError

        self.calls.append((tool, dict(args)))
        if tool in self.fail:
            raise ToolCallError(self.fail_code, f"{tool} fails in this test")
        if tool in self.empty:
            return ToolReply(id="x", ok=True, items=[])
        if tool in self.error_reply:
            return ToolReply(id="x", ok=False, error=ToolError(code=self.reply_code, message="refused in this test"))
        if tool == "image_search":
            items = [ToolItem(title=f"thing {i}", url=f"u{i}", image=encode_png(solid_image(COLOURS[i % 4])))
                     for i in range(self.thumbnails)]
        else:
            items = [ToolItem(title="page", text=f"facts about {args['query']}")]
        return ToolReply(id="x", ok=True, items=items)

    def as_clients(self) -> dict:
        return {"image_search": self, "text_search": self}

    async def close(self) -> None:
        self.closed = True


class FakeLearner:
    """A ROUTER that hands each decoded message to `policy(message) -> list of replies` (may drop by returning [])."""

    def __init__(self, policy, endpoint: str = "tcp://127.0.0.1:*") -> None:
        self.policy = policy
        self.sock = configure(zmq.asyncio.Context.instance().socket(zmq.ROUTER))
        self.endpoint = bind(self.sock, endpoint)
        self.received: list = []
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            peer, payload = await self.sock.recv_multipart()
            message = decode(payload, LearnerInbound)
            self.received.append(message)
            for reply in self.policy(message):
                await self.sock.send_multipart([peer, reply if isinstance(reply, bytes) else encode(reply)])

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.sock.close(linger=0)


def _named(name: str, value: np.ndarray, row_offset: int = 0, total_rows: int = 0) -> NamedArray:
    if name.endswith("bf16"):  # bf16 travels as uint16 bits
        bits = torch.from_numpy(np.ascontiguousarray(value)).to(torch.bfloat16).view(torch.uint16).numpy()
        return NamedArray(name=name, array=to_ndarray(bits, dtype="bfloat16"), row_offset=row_offset,
                          total_rows=total_rows)
    return NamedArray(name=name, array=to_ndarray(np.ascontiguousarray(value)), row_offset=row_offset,
                      total_rows=total_rows)


def weight_buckets(version: int, tensors: dict[str, np.ndarray], per_bucket: int = 1,
                   chunk_rows: int = 0) -> list[WeightBucket]:
    """`tensors` as the learner would publish them (names ending in bf16 travel as bfloat16). With `chunk_rows`,
    a tensor with more rows than that travels as row chunks, one chunk per bucket (learner/README.md)."""
    pieces: list[list[NamedArray]] = []
    whole: list[NamedArray] = []
    for name in sorted(tensors):
        value = tensors[name]
        if chunk_rows and value.ndim and value.shape[0] > chunk_rows:
            for start in range(0, value.shape[0], chunk_rows):
                pieces.append([_named(name, value[start:start + chunk_rows], start, value.shape[0])])
        else:
            whole.append(_named(name, value))
    pieces += [whole[i:i + per_bucket] for i in range(0, len(whole), per_bucket)]
    return [WeightBucket(version=version, index=i, num_buckets=len(pieces), tensors=arrays)
            for i, arrays in enumerate(pieces)]
