"""One MMSearch-R1 episode, token-in/token-out: parse each generated turn, call the search tools, and append the
tool results as new tokens, so the trajectory's token ids are exactly the ones the engine consumed and produced.

Parsing (`parse_turn`) is pure. `EpisodeTokenizer` renders chat-template pieces to token ids (each piece tokenised
on its own and appended; generated tokens are never decoded and re-encoded). `run_episode` is the async loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol

import numpy as np
from PIL import Image

from actors import prompts
from actors.config import EpisodeConfig, SamplingConfig
from actors.engine import Engine, EngineError, EngineHung, TurnRequest
from actors.reward import Reward
from protocol import ToolReply, Trajectory, to_ndarray
from protocol.images import ImageError, decode_image, image_size
from protocol.metrics import Metrics
from tool_servers.client import ToolCallError

log = logging.getLogger(__name__)

IMAGE_SEARCH, TEXT_SEARCH = "image_search", "text_search"
ActionKind = Literal["answer", "image_search", "text_search", "invalid_call", "none"]
_SENTINEL = "\u2063forage-turn-end\u2063"  # stands in for an assistant turn's content when rendering the template


# ---------------------------------------------------------------- parsing (pure)

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


# ---------------------------------------------------------------- token pieces

class EpisodeTokenizer:
    """Token ids of the prompt pieces an episode appends, rendered with the model's own chat template."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
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
        image_processor = processor.image_processor
        self._merge = int(getattr(image_processor, "merge_size", 1)) ** 2

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> "EpisodeTokenizer":
        from transformers import AutoProcessor

        return cls(AutoProcessor.from_pretrained(str(model_path)))

    def _encode(self, text: str, images: int, what: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        found = ids.count(self.image_pad_id)
        if found != images:
            raise ValueError(f"{what}: {found} image placeholders for {images} images in {text!r}")
        return ids

    def first_prompt(self, question: str) -> list[int]:
        """The first user turn plus the generation prompt, with one placeholder for the question's image."""
        text = self.processor.apply_chat_template([prompts.first_user_message(question)], tokenize=False,
                                                  add_generation_prompt=True)
        return self._encode(text, 1, "first prompt")

    def continuation(self, results: list[tuple[str, str, bool]]) -> list[int]:
        """Tokens that close the assistant turn, then the <information> user turn and the generation prompt."""
        return self.continuation_with(prompts.information_message(results),
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


def first_prompt_length(tok: EpisodeTokenizer, question: "Question") -> int:
    """Tokens of the first prompt once the engine has expanded the question image; raises ValueError on a bad
    image. Only the image header is read."""
    try:
        image_tokens = tok.image_tokens_of_size(*image_size(question.image))
    except ImageError as exc:
        raise ValueError(f"question {question.id}: unreadable image ({exc})") from exc
    return len(tok.first_prompt(question.question)) - 1 + image_tokens


# ---------------------------------------------------------------- the episode

class ToolCaller(Protocol):
    """tool_servers.client.ToolClient's call (one client per tool)."""

    async def call(self, tool: str, args: Mapping[str, Any], deadline_s: float | None = None) -> ToolReply: ...


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str
    aliases: list[str]
    image: bytes
    kind: str = ""
    search_label: str = ""


@dataclass
class EpisodeResult:
    """Per-token lists share one length; `turns` are the decoded assistant turns (for the reward)."""

    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    turns: list[str] = field(default_factory=list)
    image_searches: int = 0
    text_searches: int = 0
    tool_errors: int = 0
    finish_reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def extend(self, tokens: list[int], generated: bool, logprobs: list[float] | None = None,
               versions: list[int] | None = None) -> None:
        n = len(tokens)
        self.token_ids.extend(tokens)
        self.loss_mask.extend([1 if generated else 0] * n)
        self.logprobs.extend(logprobs if generated else [0.0] * n)
        self.versions.extend(versions if generated else [-1] * n)

    def to_trajectory(self, reward: Reward) -> Trajectory:
        return Trajectory(
            token_ids=to_ndarray(np.asarray(self.token_ids, dtype=np.int32)),
            loss_mask=to_ndarray(np.asarray(self.loss_mask, dtype=np.uint8)),
            behaviour_logprobs=to_ndarray(np.asarray(self.logprobs, dtype=np.float32)),
            versions=to_ndarray(np.asarray(self.versions, dtype=np.int32)),
            images=list(self.images), reward=reward.total, reward_parts=reward.parts(),
            image_searches=self.image_searches, text_searches=self.text_searches, tool_errors=self.tool_errors,
            num_turns=len(self.turns), finish_reason=self.finish_reason, timings=dict(self.timings),
        )


async def run_episode(engine: Engine, tok: EpisodeTokenizer, tools: Mapping[str, ToolCaller], question: Question,
                      cfg: EpisodeConfig, sampling: SamplingConfig, request_id: str, seed: int | None = None,
                      metrics: Metrics | None = None) -> EpisodeResult:
    """Play one episode to its end; the result's finish_reason says why it ended (every turn either ends the
    episode or makes a call, and a call in the last turn ends it, so the loop always ends by a `break`).

    Engine errors propagate (the caller re-runs the whole episode); tool failures do not: the model reads
    MMSearch-R1's in-band error text and the error is counted."""
    metrics = metrics or Metrics()
    started = time.perf_counter()
    result = EpisodeResult(images=[question.image])
    images = [decode_image(question.image)]
    prompt = tok.first_prompt(question.question)  # the running token list as sent: one placeholder per image
    pending_extra = tok.image_tokens(images[0]) - 1  # expansion of images the engine has not seen yet
    consumed = 0  # prefix of `prompt` the engine has consumed (its expanded form is result.token_ids)
    generate_s = tool_s = 0.0
    for turn in range(cfg.max_turns):
        expected_len = len(result.token_ids) + (len(prompt) - consumed) + pending_extra
        budget = min(cfg.max_new_tokens_per_turn, cfg.max_total_tokens - expected_len)
        if budget < 1:
            result.finish_reason = "max_total_tokens"
            break
        t0 = time.perf_counter()
        request = TurnRequest(
            request_id=f"{request_id}-t{turn}", prompt_token_ids=list(prompt), images=list(images),
            max_tokens=budget, sampling=sampling, stop_token_ids=tok.stop_token_ids,
            stop_strings=tok.stop_strings, seed=None if seed is None else (seed * 1_000_003 + turn) % (1 << 31))
        try:
            out = await asyncio.wait_for(engine.generate(request), cfg.turn_timeout_s)
        except asyncio.TimeoutError:
            metrics.inc("engine_turn_timeouts")
            raise EngineHung(f"{request.request_id}: no output within turn_timeout_s={cfg.turn_timeout_s:g} s "
                             f"(a hung engine)") from None
        generate_s += time.perf_counter() - t0
        known = len(result.token_ids)
        if out.prompt_token_ids[:known] != result.token_ids:
            raise EngineError(f"{request_id} turn {turn}: the engine's prompt does not extend the trajectory")
        if len(out.prompt_token_ids) != expected_len:
            metrics.inc("image_token_estimate_misses")
            log.warning("%s turn %d: expected a %d-token prompt, the engine expanded it to %d", request_id, turn,
                        expected_len, len(out.prompt_token_ids))
        result.extend(out.prompt_token_ids[known:], generated=False)
        tokens, logprobs, versions = out.token_ids, out.logprobs, out.versions
        cut = next((i for i, t in enumerate(tokens) if t in tok.forbidden_ids), None)
        if cut is not None:  # keep the exact prefix sampled before the placeholder, like a length cut
            tokens, logprobs, versions = tokens[:cut], logprobs[:cut], versions[:cut]
        result.extend(tokens, generated=True, logprobs=logprobs, versions=versions)
        prompt.extend(tokens)
        consumed, pending_extra = len(prompt), 0
        text = tok.decode(tokens)
        result.turns.append(text)
        if cut is not None:
            result.finish_reason = "invalid_token"
            break
        action = parse_turn(text)

        if action.kind == "answer":
            result.finish_reason = "answer"
            break
        if out.finish_reason == "length":  # a turn that never stopped by itself
            result.finish_reason = "max_new_tokens" if budget == cfg.max_new_tokens_per_turn else "max_total_tokens"
            break
        if action.kind == TEXT_SEARCH and len(action.query) > cfg.max_query_chars:
            metrics.inc("queries_too_long")
            if cfg.long_query == "invalid":
                action = TurnAction("invalid_call", error="query_too_long")
            else:  # the tool servers refuse long queries; a cut query still searches
                action = TurnAction(TEXT_SEARCH, query=action.query[:cfg.max_query_chars])
        if action.kind in ("none", "invalid_call"):
            result.finish_reason = "no_answer" if action.kind == "none" else "invalid_call"
            if action.error:
                metrics.inc(f"malformed_{action.error}")
            break
        if turn == cfg.max_turns - 1:  # no turn is left to read the results in
            result.finish_reason = "search_in_last_turn"
            break
        over = _over_limit(action, result, cfg)
        if over and cfg.on_search_over_limit == "end":
            result.finish_reason = over
            break

        t0 = time.perf_counter()
        if over:  # on_search_over_limit == "inform": no call; the model is told to answer on its own
            metrics.inc(f"searches_refused_{action.kind}")
            message, new_images, new_bytes = prompts.notice_message(prompts.SEARCH_LIMIT), [], []
        else:
            message, new_images, new_bytes = await _search(action, question, tools, cfg, result, metrics)
        tool_s += time.perf_counter() - t0
        prompt.extend(tok.continuation_with(message, len(new_images)))
        images.extend(new_images)
        result.images.extend(new_bytes)
        pending_extra = sum(tok.image_tokens(img) - 1 for img in new_images)
    result.timings = {"episode_s": time.perf_counter() - started, "generate_s": generate_s, "tool_s": tool_s}
    metrics.inc(f"finish_{result.finish_reason}")
    return result


def _over_limit(action: TurnAction, result: EpisodeResult, cfg: EpisodeConfig) -> str:
    """The finish reason a search would have for going beyond its limit, or ""."""
    if action.kind == IMAGE_SEARCH and result.image_searches >= cfg.max_image_searches:
        return "image_search_limit"
    if action.kind == TEXT_SEARCH and result.text_searches >= cfg.max_text_searches:
        return "text_search_limit"
    return ""


async def _search(action: TurnAction, question: Question, tools: Mapping[str, ToolCaller], cfg: EpisodeConfig,
                  result: EpisodeResult, metrics: Metrics) -> tuple[dict, list[Image.Image], list[bytes]]:
    """Run the call; return the user message to show, the images it holds and their bytes.

    A failed call (error reply, no reply by the deadline, unknown tool) shows MMSearch-R1's in-band error text
    and is counted; a call that succeeds with no hits shows "no results".
    """
    tool = action.kind
    if tool == IMAGE_SEARCH:
        result.image_searches += 1
        args: dict[str, Any] = {"image": question.image}
    else:
        result.text_searches += 1
        args = {"query": action.query}
    client = tools.get(tool)
    started = time.perf_counter()
    try:
        if client is None:
            raise ToolCallError("unknown_tool", f"no client for {tool!r}; configured: {sorted(tools)}")
        reply = await client.call(tool, args, deadline_s=cfg.tool_deadline_s)
        if not reply.ok:
            code = reply.error.code if reply.error else "backend_error"
            raise ToolCallError(code, reply.error.message if reply.error else "reply not ok")
    except (ToolCallError, asyncio.TimeoutError) as exc:
        result.tool_errors += 1
        metrics.inc(f"tool_errors_{tool}")
        log.warning("%s failed for question %s: %s", tool, question.id, exc)
        return prompts.notice_message(prompts.SEARCH_ERROR), [], []
    finally:
        metrics.observe(f"tool_latency_s_{tool}", time.perf_counter() - started)
    if not reply.items:
        metrics.inc(f"tool_empty_{tool}")
    shown: list[tuple[str, str, bool]] = []
    new_images: list[Image.Image] = []
    new_bytes: list[bytes] = []
    for item in reply.items[:cfg.max_results]:
        text = item.text[:cfg.max_result_chars]
        has_image = tool == IMAGE_SEARCH and item.image is not None
        if has_image:
            try:
                new_images.append(decode_image(item.image))
                new_bytes.append(item.image)
            except ValueError as exc:
                metrics.inc("tool_bad_images")
                log.warning("%s returned a bad thumbnail for %s: %s", tool, question.id, exc)
                has_image = False
        shown.append((item.title, text, has_image))
    return prompts.information_message(shown), new_images, new_bytes
