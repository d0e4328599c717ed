"""One MMSearch-R1 episode on a rollout engine, token-in/token-out: parse each generated turn, call the search tools,
and append the tool results as new tokens, so the trajectory's token ids are exactly the ones the engine consumed
and produced. The episode format itself (prompts, tokenisation, turn parsing) lives in episode/; `run_episode` is
the async loop that plays it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image

from actors.config import EpisodeConfig, SamplingConfig
from actors.engine import Engine, EngineError, EngineHung, TurnRequest
from actors.reward import Reward
from episode import prompts
from episode.tokenizer import EpisodeTokenizer
from episode.turns import FORCED_ACTIONS, IMAGE_SEARCH, TEXT_SEARCH, TurnAction, parse_turn
from protocol import ToolReply, Trajectory, to_ndarray
from protocol.images import ImageError, decode_image, image_size
from protocol.metrics import Metrics
from tool_servers.client import ToolCallError

log = logging.getLogger(__name__)


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
    tool_failed: bool = False  # a tool outage ended the episode (finish_reason "tool_failed")
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
            tool_failed=self.tool_failed,
        )


async def _generate(engine: Engine, request: TurnRequest, cfg: EpisodeConfig, metrics: Metrics) -> Any:
    try:
        return await asyncio.wait_for(engine.generate(request), cfg.turn_timeout_s)
    except asyncio.TimeoutError:
        metrics.inc("engine_turn_timeouts")
        raise EngineHung(f"{request.request_id}: no output within turn_timeout_s={cfg.turn_timeout_s:g} s "
                         f"(a hung engine)") from None


async def run_episode(engine: Engine, tok: EpisodeTokenizer, tools: Mapping[str, ToolCaller], question: Question,
                      cfg: EpisodeConfig, sampling: SamplingConfig, request_id: str, seed: int | None = None,
                      metrics: Metrics | None = None, workflow: Sequence[str] | None = None,
                      hint: str | None = None) -> EpisodeResult:
    """Play one episode to its end; the result's finish_reason says why it ended (every turn either ends the
    episode or makes a call, and a call in the last turn ends it, so the loop always ends by a `break`).

    `workflow` (evaluation only) forces the action of each turn: the model writes its reason, then the turn goes
    on with FORCED_ACTIONS[workflow[i]] (image_search, text_search or answer) appended as prompt tokens (mask 0),
    and the model writes the query or answer. A turn whose reason does not close is left as generated; turns
    beyond the workflow are free. `hint` adds a workflow hint (episode.prompts.HINTS) to the first user turn.

    Engine errors propagate (the caller re-runs the whole episode); tool failures do not. A call the tool rejects
    (bad_request, too_large: the model's malformed call) shows MMSearch-R1's in-band error text and the episode
    goes on; a call that fails for infrastructure reasons (tool_servers.errors.INFRASTRUCTURE_CODES: deadline,
    every replica down, server error) ends it as `tool_failed`, an outcome that says nothing about the model: the
    learner trains without it and eval reports it apart. Both are counted."""
    if workflow is not None:
        unknown = [action for action in workflow if action not in FORCED_ACTIONS]
        if unknown:
            raise ValueError(f"workflow {list(workflow)}: unknown actions {unknown}; known: {sorted(FORCED_ACTIONS)}")
    metrics = metrics or Metrics()
    started = time.perf_counter()
    result = EpisodeResult(images=[question.image])
    images = [decode_image(question.image)]
    prompt = tok.first_prompt(question.question, hint)  # the running token list as sent: one placeholder per image
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
        forced = workflow[turn] if workflow is not None and turn < len(workflow) else None
        request = TurnRequest(
            request_id=f"{request_id}-t{turn}", prompt_token_ids=list(prompt), images=list(images),
            max_tokens=budget, sampling=sampling,
            stop_token_ids=tok.stop_token_ids + (tok.reason_stop_ids if forced else []),
            stop_strings=tok.stop_strings + (tok.reason_stop_strings if forced else []),
            seed=None if seed is None else (seed * 1_000_003 + turn) % (1 << 31))
        out = await _generate(engine, request, cfg, metrics)
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
        turn_ids = list(tokens)
        if forced and cut is None and tok.decode(tokens).rstrip().endswith(prompts.REASON_CLOSE):
            metrics.inc("forced_turns")
            action_ids = tok.tokenizer.encode(FORCED_ACTIONS[forced], add_special_tokens=False)
            prompt.extend(action_ids)
            turn_ids += action_ids
            result.extend(action_ids, generated=False)  # the engine sees them as prompt; nobody samples them
            consumed = len(prompt)
            rest = budget - len(tokens) - len(action_ids)
            if forced != IMAGE_SEARCH and rest > 0:  # the model writes the query or the answer
                request = TurnRequest(
                    request_id=f"{request_id}-t{turn}f", prompt_token_ids=list(prompt), images=list(images),
                    max_tokens=rest, sampling=sampling, stop_token_ids=tok.stop_token_ids,
                    stop_strings=tok.stop_strings, seed=request.seed)
                out = await _generate(engine, request, cfg, metrics)
                if out.prompt_token_ids != result.token_ids:
                    raise EngineError(f"{request_id} turn {turn}: the engine's prompt does not extend the trajectory")
                tokens, logprobs, versions = out.token_ids, out.logprobs, out.versions
                cut = next((i for i, t in enumerate(tokens) if t in tok.forbidden_ids), None)
                if cut is not None:
                    tokens, logprobs, versions = tokens[:cut], logprobs[:cut], versions[:cut]
                result.extend(tokens, generated=True, logprobs=logprobs, versions=versions)
                prompt.extend(tokens)
                turn_ids += tokens
                consumed = len(prompt)
        generate_s += time.perf_counter() - t0
        text = tok.decode(turn_ids)
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
            shown = tok.prompt.notice_message(prompts.SEARCH_LIMIT), [], []
        else:
            shown = await _search(action, question, tools, cfg, result, metrics, tok.prompt)
        tool_s += time.perf_counter() - t0
        if shown is None:  # a tool outage: whatever the model did next would not be its own doing
            result.finish_reason = "tool_failed"
            break
        message, new_images, new_bytes = shown
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
                  result: EpisodeResult, metrics: Metrics, fmt: prompts.PromptFormat = prompts.DEFAULT_FORMAT
                  ) -> tuple[dict, list[Image.Image], list[bytes]] | None:
    """Run the call; return the user message to show, the images it holds and their bytes, or None when the call
    failed for infrastructure reasons (the episode is then `tool_failed`).

    A call the tool rejects (bad_request, too_large) shows MMSearch-R1's in-band error text; a call that succeeds
    with no hits shows "no results". Every failure is counted (tool_errors_<tool>; outages also
    tool_outages_<tool>).
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
        if not isinstance(exc, ToolCallError) or exc.infrastructure:
            result.tool_failed = True
            metrics.inc(f"tool_outages_{tool}")
            log.warning("%s outage for question %s, the episode is tool_failed: %s", tool, question.id, exc)
            return None
        log.warning("%s rejected the call for question %s: %s", tool, question.id, exc)
        return fmt.notice_message(prompts.SEARCH_ERROR), [], []
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
    return fmt.information_message(shown), new_images, new_bytes
