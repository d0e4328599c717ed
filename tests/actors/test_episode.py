"""The episode's token pieces and the episode loop against a scripted engine and fake tools (turn parsing itself:
tests/episode/test_episode_turns.py)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from actors.config import EpisodeConfig, SamplingConfig
from actors.engine import EngineError, EngineHung
from actors.episode import Question, first_prompt_length, run_episode
from actors.reward import compute_reward
from actors_helpers import FakeTools, ScriptedEngine, solid_image
from episode import prompts
from episode.tokenizer import EpisodeTokenizer
from protocol import TrajectoryGroup, decode, encode, from_ndarray
from protocol.images import encode_png
from protocol.metrics import Metrics
from protocol.sockets import free_port

SAMPLING = SamplingConfig()


# ---------------------------------------------------------------- token pieces

def test_first_prompt_and_continuation_are_template_pieces(episode_tokenizer):
    tok = episode_tokenizer
    first = tok.first_prompt("what is it")
    assert first.count(tok.image_pad_id) == 1
    text = tok.decode(first)
    assert tok.prompt is prompts.COMPACT  # the tiny model's folder records its format
    assert text == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is it<|im_end|>\n<|im_start|>assistant\n"
    worded = EpisodeTokenizer(tok.processor, prompts.MMSEARCH_R1)
    text = worded.decode(worded.first_prompt("what is it"))
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>question: what is it\n"
                           + prompts.INSTRUCTION)
    assert text.endswith("<|im_start|>assistant\n")
    assert prompts.CONTINUE_INSTRUCTION in worded.decode(worded.continuation([("a", "", False)]))
    assert prompts.CONTINUE_INSTRUCTION not in tok.decode(tok.continuation([("a", "", False)]))

    piece = tok.continuation([("a thing", "", True), ("b", "", True), ("page", "words", False)])
    assert piece.count(tok.image_pad_id) == 2
    piece_text = tok.decode(piece)
    assert piece_text.startswith("<|im_end|>\n<|im_start|>user\n")  # closes the assistant turn first
    assert piece_text.endswith("<|im_start|>assistant\n")
    assert prompts.INFO_OPEN in piece_text and "title: page\nwords" in piece_text

    empty = tok.decode(tok.continuation([]))
    assert prompts.NO_RESULTS in empty and "<|image_pad|>" not in empty


def test_token_pieces_facts(episode_tokenizer):
    tok = episode_tokenizer
    assert tok.image_tokens(solid_image((1, 2, 3))) == 4  # 56x56 -> 16 patches -> 4 merged tokens
    vocab = tok.tokenizer.get_vocab()
    assert {vocab[t] for t in prompts.TURN_STOPS} | {vocab["<|im_end|>"]} == set(tok.stop_token_ids)
    assert tok.stop_strings == []  # every tag is one token in the tiny vocabulary
    assert vocab["<|image_pad|>"] in tok.forbidden_ids


# ---------------------------------------------------------------- the episode loop

def _ids(tok, text: str) -> list[int]:
    return tok.tokenizer.encode(text, add_special_tokens=False)


def _question() -> Question:
    return Question(id="q1", question="what is this", answer="blue star", aliases=["star"],
                    image=encode_png(solid_image((30, 30, 200))), kind="image_text", search_label="search")


def _play(tok, turns, tools=None, cfg=None, finish_reasons=None, metrics=None):
    engine = ScriptedEngine(turns, tok.image_pad_id, image_tokens=4, version=3, finish_reasons=finish_reasons)
    tools = tools or FakeTools(thumbnails=2)
    result = asyncio.run(run_episode(engine, tok, tools.as_clients(), _question(), cfg or EpisodeConfig(),
                                     SAMPLING, request_id="g-e0", seed=7, metrics=metrics))
    return engine, tools, result


def test_a_forced_workflow_appends_each_action_after_the_models_reason(episode_tokenizer):
    """always_search on a model that wanted to answer at once: turn 1 is its reason + the forced image call (no
    second request), turn 2 its reason + forced <text_search> + its query, turn 3 its reason + forced <answer> +
    its answer. The forced tokens are prompt tokens (mask 0), what the model wrote is generated (mask 1)."""
    tok = episode_tokenizer
    outputs = [_ids(tok, "<reason> i know it </reason>"),                     # turn 1: reason only (forced image)
               _ids(tok, "<reason> look up </reason>"), _ids(tok, " star town </text_search>"),  # turn 2
               _ids(tok, "<reason> so </reason>"), _ids(tok, " blue star </answer>")]          # turn 3
    engine = ScriptedEngine([list(t) for t in outputs], tok.image_pad_id, image_tokens=4, version=3)
    tools = FakeTools(thumbnails=2)
    metrics = Metrics()
    workflow = ("image_search", "text_search", "answer")
    result = asyncio.run(run_episode(engine, tok, tools.as_clients(), _question(), EpisodeConfig(), SAMPLING,
                                     request_id="g-e0", metrics=metrics, workflow=workflow))
    assert result.finish_reason == "answer" and (result.image_searches, result.text_searches) == (1, 1)
    assert result.turns == ["<reason> i know it </reason><search><img></search>",
                            "<reason> look up </reason><text_search> star town </text_search>",
                            "<reason> so </reason><answer> blue star </answer>"]
    assert tools.calls[1][1] == {"query": "star town"} and metrics.counter("forced_turns") == 3
    assert len(engine.requests) == 5  # the image call needs no second request
    reason_close = tok.tokenizer.convert_tokens_to_ids(prompts.REASON_CLOSE)
    assert reason_close in engine.requests[0].stop_token_ids and reason_close not in engine.requests[2].stop_token_ids
    generated = tok.decode([t for t, m in zip(result.token_ids, result.loss_mask) if m])
    assert generated == "".join(tok.decode(o) for o in outputs)  # exactly what the model wrote
    forced = [t for t, m in zip(result.token_ids, result.loss_mask) if not m]
    assert tok.decode(forced).count(prompts.IMAGE_SEARCH_CALL) == 1
    assert tok.decode(forced).count(prompts.ANSWER_OPEN) == 1
    assert compute_reward(result.turns, "blue star", []).accuracy == 1.0


def test_a_forced_turn_whose_reason_never_closes_is_left_as_generated(episode_tokenizer):
    tok = episode_tokenizer
    outputs = [_ids(tok, "<reason> hmm <answer> red </answer>")]
    engine = ScriptedEngine([list(t) for t in outputs], tok.image_pad_id, image_tokens=4, version=3)
    result = asyncio.run(run_episode(engine, tok, FakeTools(thumbnails=2).as_clients(), _question(),
                                     EpisodeConfig(), SAMPLING, request_id="g", workflow=("image_search",)))
    assert result.turns == ["<reason> hmm <answer> red </answer>"] and len(engine.requests) == 1
    with pytest.raises(ValueError, match="unknown actions"):
        asyncio.run(run_episode(engine, tok, {}, _question(), EpisodeConfig(), SAMPLING, request_id="g",
                                workflow=("web_search",)))


def test_three_turn_episode_is_token_in_token_out(episode_tokenizer):
    tok = episode_tokenizer
    turns = [_ids(tok, "<reason> look </reason><search><img></search>"),
             _ids(tok, "<reason> name </reason><text_search> star town </text_search>"),
             _ids(tok, "<reason> done </reason><answer> blue star </answer>")]
    engine, tools, result = _play(tok, [list(t) for t in turns])

    assert result.finish_reason == "answer" and len(result.turns) == 3
    assert (result.image_searches, result.text_searches, result.tool_errors) == (1, 1, 0)
    assert [c[0] for c in tools.calls] == ["image_search", "text_search"]
    assert tools.calls[0][1] == {"image": _question().image} and tools.calls[1][1] == {"query": "star town"}
    # each request = previous request + its output + the appended pieces; images accumulate 1 -> 3 -> 3
    reqs = engine.requests
    assert [len(r.images) for r in reqs] == [1, 3, 3]
    assert reqs[0].prompt_token_ids == tok.first_prompt("what is this")
    for prev, nxt, out in zip(reqs, reqs[1:], turns):
        assert nxt.prompt_token_ids[:len(prev.prompt_token_ids) + len(out)] == prev.prompt_token_ids + out
    assert reqs[1].prompt_token_ids[len(reqs[0].prompt_token_ids) + len(turns[0]):] == tok.continuation(
        [("thing 0", "", True), ("thing 1", "", True)])
    # trajectory = last engine prompt (expanded) + last output; masks/logprobs/versions line up
    last = engine.outputs[-1]
    assert result.token_ids == last.prompt_token_ids + last.token_ids
    mask = np.array(result.loss_mask)
    assert mask.sum() == sum(len(t) for t in turns)
    gen_positions = np.flatnonzero(mask)
    assert [result.token_ids[i] for i in gen_positions] == [t for turn in turns for t in turn]
    assert all(result.versions[i] == 3 for i in gen_positions)
    assert all(v == -1 and lp == 0.0 for v, lp, m in zip(result.versions, result.logprobs, mask) if not m)
    assert [result.logprobs[i] for i in gen_positions] == [lp for o in engine.outputs for lp in o.logprobs]
    assert result.token_ids.count(tok.image_pad_id) == 4 * 3  # question image + two thumbnails, 4 tokens each
    assert len(result.images) == 3 and result.images[0] == _question().image
    # per-turn seeds are derived from the episode seed and differ by turn
    assert len({r.seed for r in reqs}) == 3
    assert first_prompt_length(tok, _question()) == len(engine.outputs[0].prompt_token_ids)

    reward = compute_reward(result.turns, "blue star", [])
    group = TrajectoryGroup(group_id="g", actor_id="a", prompt_id="q1", trajectories=[result.to_trajectory(reward)])
    back = decode(encode(group), TrajectoryGroup).trajectories[0]
    assert from_ndarray(back.token_ids).tolist() == result.token_ids
    assert back.reward == pytest.approx(0.91) and back.num_turns == 3 and back.finish_reason == "answer"


@pytest.mark.parametrize("tools", [FakeTools(fail=("image_search",), fail_code="bad_request"),
                                   FakeTools(error_reply=("image_search",), reply_code="too_large")])
def test_a_rejected_call_shows_the_in_band_error_text(episode_tokenizer, tools):
    """The tool refused the model's call itself (bad_request, too_large): the model's error, shown in-band."""
    tok = episode_tokenizer
    turns = [_ids(tok, "<reason> a </reason><search><img></search>"),
             _ids(tok, "<reason> b </reason><answer> x </answer>")]
    metrics = Metrics()
    engine, tools, result = _play(tok, turns, tools=tools, metrics=metrics)
    assert result.tool_errors == 1 and result.image_searches == 1 and result.finish_reason == "answer"
    appended = engine.requests[1].prompt_token_ids[len(engine.requests[0].prompt_token_ids) + len(turns[0]):]
    assert appended == tok.continuation_with(tok.prompt.notice_message(prompts.SEARCH_ERROR))
    text = tok.decode(appended)
    assert prompts.SEARCH_ERROR in text and prompts.NO_RESULTS not in text
    assert len(engine.requests[1].images) == 1
    assert metrics.counter("tool_errors_image_search") == 1 and metrics.counter("tool_outages_image_search") == 0
    assert metrics.snapshot()["tool_latency_s_image_search_count"] == 1
    assert not result.tool_failed and not result.to_trajectory(compute_reward(result.turns, "x", [])).tool_failed


@pytest.mark.parametrize("tools", [FakeTools(fail=("image_search",), fail_code="backend_error"),
                                   FakeTools(fail=("image_search",), fail_code="overloaded"),
                                   FakeTools(error_reply=("image_search",), reply_code="timeout")])
def test_an_outage_ends_the_episode_as_tool_failed(episode_tokenizer, tools):
    """The tool's service failed (server error, overload, deadline): the episode ends at once, flagged, and the
    flag travels in its Trajectory; the model never sees (nor answers after) the failure."""
    tok = episode_tokenizer
    turns = [_ids(tok, "<reason> a </reason><search><img></search>"),
             _ids(tok, "<reason> b </reason><answer> x </answer>")]
    metrics = Metrics()
    engine, tools, result = _play(tok, turns, tools=tools, metrics=metrics)
    assert result.tool_failed and result.finish_reason == "tool_failed"
    assert len(engine.requests) == 1 and len(result.turns) == 1  # nothing generated after the outage
    assert (result.tool_errors, result.image_searches) == (1, 1)
    assert metrics.counter("tool_outages_image_search") == 1 and metrics.counter("finish_tool_failed") == 1
    traj = result.to_trajectory(compute_reward(result.turns, "x", []))
    assert traj.tool_failed and decode(encode(TrajectoryGroup(group_id="g", actor_id="a", prompt_id="q",
                                                              trajectories=[traj])), TrajectoryGroup
                                       ).trajectories[0].tool_failed


def test_empty_hits_show_no_results(episode_tokenizer):
    tok = episode_tokenizer
    turns = [_ids(tok, "<reason> a </reason><text_search> nothing </text_search>"),
             _ids(tok, "<reason> b </reason><answer> x </answer>")]
    metrics = Metrics()
    engine, tools, result = _play(tok, turns, tools=FakeTools(empty=("text_search",)), metrics=metrics)
    assert result.tool_errors == 0 and result.text_searches == 1 and result.finish_reason == "answer"
    appended = engine.requests[1].prompt_token_ids[len(engine.requests[0].prompt_token_ids) + len(turns[0]):]
    assert appended == tok.continuation([])
    assert prompts.NO_RESULTS in tok.decode(appended) and prompts.SEARCH_ERROR not in tok.decode(appended)
    assert metrics.counter("tool_empty_text_search") == 1


@pytest.mark.parametrize("text, error", [
    ("<reason> a </reason><search><search><img></search>", "nested_tags"),
    ("<reason> a </reason><text_search> x <text_search> y </text_search>", "nested_tags"),
    ("<reason> a </reason><text_search>  </text_search>", "empty_query"),
    ("<reason> a </reason><search> a cat </search>", "bad_image_call"),
    ("<reason> a </reason></answer>", "orphan_close"),
])
def test_malformed_calls_end_the_episode_and_are_counted(episode_tokenizer, text, error):
    tok = episode_tokenizer
    metrics = Metrics()
    engine, tools, result = _play(tok, [_ids(tok, text)], metrics=metrics)
    assert result.finish_reason == "invalid_call" and not tools.calls and len(engine.requests) == 1
    assert metrics.counter(f"malformed_{error}") == 1 and metrics.counter("finish_invalid_call") == 1
    assert compute_reward(result.turns, "blue star", []).total == 0.0


def test_a_10k_character_query_is_cut_or_refused(episode_tokenizer):
    tok = episode_tokenizer
    query = " ".join(["star"] * 2000)  # 9,999 characters
    turns = [_ids(tok, f"<reason> a </reason><text_search> {query} </text_search>"),
             _ids(tok, "<reason> b </reason><answer> x </answer>")]
    metrics = Metrics()
    cfg = EpisodeConfig(max_new_tokens_per_turn=4096, max_total_tokens=8192, max_query_chars=100)
    engine, tools, result = _play(tok, [list(t) for t in turns], cfg=cfg, metrics=metrics)
    assert result.finish_reason == "answer" and tools.calls == [("text_search", {"query": query[:100]})]
    assert metrics.counter("queries_too_long") == 1

    metrics = Metrics()
    strict = EpisodeConfig(max_new_tokens_per_turn=4096, max_total_tokens=8192, max_query_chars=100,
                           long_query="invalid")
    engine, tools, result = _play(tok, [list(t) for t in turns], cfg=strict, metrics=metrics)
    assert result.finish_reason == "invalid_call" and not tools.calls
    assert metrics.counter("malformed_query_too_long") == 1


def test_a_policy_that_never_stops_is_cut_every_time(episode_tokenizer):
    tok = episode_tokenizer
    babble = _ids(tok, "red blue green " * 40)
    metrics = Metrics()
    cfg = EpisodeConfig(max_new_tokens_per_turn=16)
    engine, tools, result = _play(tok, [babble], cfg=cfg, finish_reasons=["length"], metrics=metrics)
    assert result.finish_reason == "max_new_tokens" and sum(result.loss_mask) == 16 and not tools.calls
    assert metrics.counter("finish_max_new_tokens") == 1
    # ... also when the call tag it finally writes would be cut off: the cut turn is not a call
    cut_call = _ids(tok, "red " * 20 + "<text_search> q </text_search>")
    engine, tools, result = _play(tok, [cut_call], cfg=cfg, finish_reasons=["length"])
    assert result.finish_reason == "max_new_tokens" and not tools.calls


def test_search_over_the_limit_can_inform_instead_of_ending(episode_tokenizer):
    tok = episode_tokenizer
    texts = ["<reason> a </reason><search><img></search>", "<reason> a </reason><search><img></search>",
             "<reason> a </reason><answer> blue star </answer>"]
    metrics = Metrics()
    cfg = EpisodeConfig(on_search_over_limit="inform")
    engine, tools, result = _play(tok, [_ids(tok, t) for t in texts], cfg=cfg, metrics=metrics)
    assert result.finish_reason == "answer" and len(result.turns) == 3
    assert [c[0] for c in tools.calls] == ["image_search"] and result.image_searches == 1
    appended = engine.requests[2].prompt_token_ids[len(engine.requests[1].prompt_token_ids) + len(engine.outputs[1].token_ids):]
    assert appended == tok.continuation_with(tok.prompt.notice_message(prompts.SEARCH_LIMIT))
    assert metrics.counter("searches_refused_image_search") == 1
    assert compute_reward(result.turns, "blue star", []).format == 0.0  # image, image, answer is no valid pattern
    # a search in the last turn still ends the episode: no turn is left to read its results
    engine, tools, result = _play(tok, [_ids(tok, t) for t in texts[:2]],
                                  cfg=EpisodeConfig(max_turns=2, on_search_over_limit="inform"))
    assert result.finish_reason == "search_in_last_turn"


@pytest.mark.parametrize("texts, cfg, reason, n_turns", [
    (["<reason> a </reason><search><img></search>", "<reason> a </reason><search><img></search>"],
     EpisodeConfig(), "image_search_limit", 2),
    (["<reason> a </reason><text_search> q </text_search>", "<reason> a </reason><text_search> q </text_search>"],
     EpisodeConfig(), "text_search_limit", 2),
    (["<reason> a </reason><text_search> q </text_search>", "<reason> a </reason><search><img></search>"],
     EpisodeConfig(max_turns=2), "search_in_last_turn", 2),
    (["<reason> a </reason><search><img></search>"], EpisodeConfig(max_image_searches=0), "image_search_limit", 1),
    (["<reason> a </reason> no idea<|im_end|>"], EpisodeConfig(), "no_answer", 1),
    (["<reason> a </reason><search> cat </search>"], EpisodeConfig(), "invalid_call", 1),
])
def test_episode_limits_end_the_episode(episode_tokenizer, texts, cfg, reason, n_turns):
    tok = episode_tokenizer
    engine, tools, result = _play(tok, [_ids(tok, t) for t in texts], cfg=cfg)
    assert result.finish_reason == reason and len(result.turns) == n_turns == len(engine.requests)
    assert len(tools.calls) == n_turns - 1  # the call that broke a limit was not made


@pytest.mark.parametrize("text", ["<reason> a <|image_pad|></reason><search><img></search>",
                                  "<reason> a </reason><answer> red <|vision_start|> </answer>"])
def test_generated_vision_token_cuts_the_turn_and_ends_the_episode(episode_tokenizer, text):
    tok = episode_tokenizer
    ids = _ids(tok, text)
    cut = next(i for i, t in enumerate(ids) if t in tok.forbidden_ids)
    engine, tools, result = _play(tok, [ids])
    assert result.finish_reason == "invalid_token" and not tools.calls
    assert result.token_ids == engine.outputs[0].prompt_token_ids + ids[:cut]  # exact prefix, nothing after
    assert sum(result.loss_mask) == cut and result.logprobs[-cut:] == engine.outputs[0].logprobs[:cut]
    assert not tok.forbidden_ids.intersection(t for t, m in zip(result.token_ids, result.loss_mask) if m)
    assert compute_reward(result.turns, "red", []).total == 0.0


def test_length_and_total_token_budgets(episode_tokenizer):
    tok = episode_tokenizer
    long_turn = _ids(tok, "<reason> red blue green round square star circle shape red blue green round square star")
    engine, _, result = _play(tok, [long_turn], cfg=EpisodeConfig(max_new_tokens_per_turn=5),
                              finish_reasons=["length"])
    assert engine.requests[0].max_tokens == 5 and result.finish_reason == "max_new_tokens"
    assert sum(result.loss_mask) == 5

    first_len = len(tok.first_prompt("what is this")) + 3  # expanded: one placeholder becomes 4 tokens
    cfg = EpisodeConfig(max_total_tokens=first_len + 10)
    engine, _, result = _play(tok, [long_turn], cfg=cfg, finish_reasons=["length"])
    assert engine.requests[0].max_tokens == 10 and result.finish_reason == "max_total_tokens"
    assert len(result.token_ids) == cfg.max_total_tokens

    # the tool turn would not fit: the episode ends before asking the engine again
    turns = [_ids(tok, "<reason> a </reason><search><img></search>")]
    cfg = EpisodeConfig(max_total_tokens=first_len + len(turns[0]) + 5)
    engine, _, result = _play(tok, turns, cfg=cfg)
    assert result.finish_reason == "max_total_tokens" and len(engine.requests) == 1
    assert len(result.token_ids) <= cfg.max_total_tokens


def test_engine_prompt_that_does_not_extend_the_trajectory_is_an_error(episode_tokenizer):
    tok = episode_tokenizer

    class Diverging(ScriptedEngine):
        async def generate(self, request):
            out = await super().generate(request)
            if len(self.requests) == 2:
                out.prompt_token_ids[3] += 1
            return out

    engine = Diverging([_ids(tok, "<reason> a </reason><search><img></search>"), _ids(tok, "<answer> x </answer>")],
                       tok.image_pad_id)
    with pytest.raises(EngineError, match="does not extend"):
        asyncio.run(run_episode(engine, tok, FakeTools().as_clients(), _question(), EpisodeConfig(), SAMPLING, "r"))


def test_a_turn_with_no_output_is_a_hung_engine(episode_tokenizer):
    tok = episode_tokenizer

    class Hanging(ScriptedEngine):
        async def generate(self, request):
            if len(self.requests) == 1:  # the second turn: alive, answering nothing
                await asyncio.sleep(3600)
            return await super().generate(request)

    engine = Hanging([_ids(tok, "<reason> a </reason><search><img></search>")], tok.image_pad_id)
    metrics = Metrics()
    cfg = EpisodeConfig(turn_timeout_s=0.2)
    with pytest.raises(EngineHung, match="turn_timeout_s=0.2"):
        asyncio.run(run_episode(engine, tok, FakeTools().as_clients(), _question(), cfg, SAMPLING, "r",
                                metrics=metrics))
    assert metrics.counter("engine_turn_timeouts") == 1
    with pytest.raises(ValueError, match="turn_timeout_s"):
        EpisodeConfig(turn_timeout_s=0)


def test_bad_question_image_is_rejected(episode_tokenizer):
    tok = episode_tokenizer
    q = Question(id="q", question="x", answer="y", aliases=[], image=b"not an image")
    with pytest.raises(ValueError, match="undecodable image"):
        asyncio.run(run_episode(ScriptedEngine([], tok.image_pad_id), tok, {}, q, EpisodeConfig(), SAMPLING, "r"))


def test_a_missing_tool_client_is_an_outage_not_the_models_error(episode_tokenizer):
    """No client for the tool the model called (a deployment without it): unknown_tool, infrastructure."""
    tok = episode_tokenizer
    turns = [_ids(tok, "<reason> a </reason><text_search> q </text_search>"), _ids(tok, "<answer> y </answer>")]
    engine = ScriptedEngine(turns, tok.image_pad_id)
    result = asyncio.run(run_episode(engine, tok, {}, _question(), EpisodeConfig(), SAMPLING, "r"))
    assert result.tool_errors == 1 and result.tool_failed and result.finish_reason == "tool_failed"


class _BrokenBackend:
    """A backend whose index is gone: every batch raises (the server answers backend_error)."""

    name = "text_search"

    def validate(self, args) -> None:
        pass

    def search_batch(self, batch):
        raise RuntimeError("index file vanished")

    def close(self) -> None:
        pass


def _play_through_servers(tok, query: str, backend, limits=None, down: bool = False):
    """One text-search episode whose call goes through a real ToolClient to a real ToolServer on 127.0.0.1 (or to a
    port nobody listens on when `down`); returns the result, its metrics and the text shown after the call."""
    from tool_servers.client import ToolClient
    from tool_servers.limits import ServerLimits
    from tool_servers.server import ToolServer

    turns = [_ids(tok, f"<reason> a </reason><text_search> {query} </text_search>"),
             _ids(tok, "<reason> b </reason><answer> x </answer>")]
    cfg = EpisodeConfig(tool_deadline_s=0.4)

    async def play(endpoint: str):
        client = ToolClient([endpoint], default_deadline_s=0.4, retries=1)
        metrics = Metrics()
        engine = ScriptedEngine([list(t) for t in turns], tok.image_pad_id)
        try:
            result = await run_episode(engine, tok, {"text_search": client}, _question(), cfg, SAMPLING, "r",
                                       metrics=metrics)
        finally:
            await client.close()
        shown = ""
        if len(engine.requests) > 1:
            shown = tok.decode(engine.requests[1].prompt_token_ids[len(engine.requests[0].prompt_token_ids)
                                                                    + len(turns[0]):])
        return result, metrics, shown

    async def serve_and_play():
        if down:
            return await play(f"tcp://127.0.0.1:{free_port()}")
        server = ToolServer({"text_search": backend}, bind="tcp://127.0.0.1:*",
                            limits=ServerLimits(**(limits or {})))
        endpoint = await server.start()
        serving = asyncio.create_task(server.serve_forever())
        try:
            return await play(endpoint)
        finally:
            await server.stop(timeout_s=5.0)
            await asyncio.gather(serving, return_exceptions=True)

    return asyncio.run(serve_and_play())


@pytest.mark.parametrize("case", ["every replica down", "deadline exceeded", "server error"])
def test_an_outage_through_real_tool_servers_is_tool_failed(episode_tokenizer, case):
    """Infrastructure failures of a real ToolClient and ToolServer: nothing listens on the port (every replica
    down), the backend is slower than the deadline (the server answers timeout), the backend raises (the server
    answers backend_error). Each ends the episode as tool_failed after at most the deadline."""
    from tool_servers.backends.simulated import SimulatedSearch

    backend = {"every replica down": None, "deadline exceeded": SimulatedSearch("text_search", latency_ms=2000),
               "server error": _BrokenBackend()}[case]
    result, metrics, shown = _play_through_servers(episode_tokenizer, "star town", backend,
                                                   down=case == "every replica down")
    assert result.tool_failed and result.finish_reason == "tool_failed", result
    assert result.tool_errors == 1 and result.text_searches == 1 and shown == ""
    assert metrics.counter("tool_outages_text_search") == 1
    assert result.timings["tool_s"] < 2.0  # waited at most for the deadline, not for ever


@pytest.mark.parametrize("case", ["query too long", "query of no words"])
def test_a_malformed_call_through_real_tool_servers_is_the_models_error(episode_tokenizer, tmp_path, case):
    """The server refuses the model's query itself (too_large over its max_query_chars; bad_request for a query the
    index finds no word in): the model reads the in-band error text and the episode goes on, not tool_failed."""
    import json

    from tool_servers.backends.local_text import LocalTextSearch

    corpus = tmp_path / "pages.jsonl"
    corpus.write_text(json.dumps({"id": "p0", "title": "Star town", "text": "Star town is blue.",
                                  "url": "https://world.local/star"}) + "\n")
    query, limits = {"query too long": ("star town " * 4, {"max_query_chars": 16}),
                     "query of no words": ("!!! ???", None)}[case]
    result, metrics, shown = _play_through_servers(episode_tokenizer, query, LocalTextSearch(corpus), limits)
    assert not result.tool_failed and result.finish_reason == "answer", result
    assert result.tool_errors == 1 and prompts.SEARCH_ERROR in shown
    assert metrics.counter("tool_errors_text_search") == 1 and metrics.counter("tool_outages_text_search") == 0
