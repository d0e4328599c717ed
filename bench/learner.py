"""Learner benchmark: training tokens/s at 1 and 2 FSDP2 ranks (packed vs padded micro-batches), state-dict gather +
publish time against step time (zmq encode and fs write), and peak memory per rank, on synthetic trajectories.

    python bench/learner.py                      # 1 and 2 ranks, packed and padded, the embedded tiny model size
    python bench/learner.py --hidden 512 --layers 4 --ranks 2 --packing true --docs docs/benchmarks.md

Prints one JSON line per configuration and a markdown table; --docs appends the table (with the machine and the
command) to that file. Ranks are spawned processes with one torch thread each (gloo on 127.0.0.1).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def bench_rank(rank: int, world_size: int, port: int, model_dir: str, opts: dict[str, Any], queue) -> None:
    """One rank: warm-up step, timed steps, then gather (+ rank 0 publish) timed; results to `queue` from rank 0."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch.distributed as dist

    from gpu_check import synthetic_samples
    from learner.config import AlgoConfig, LearnerConfig
    from learner.role import join_world
    from learner.trainer import Trainer
    from learner.weights import FsWeightPublisher, ZmqWeightPublisher, gather_full_state_dict, to_checkpoint_names

    try:
        cfg = LearnerConfig(world_size=world_size, lr=1e-4, micro_batch_tokens=opts["micro_batch_tokens"],
                            packing=opts["packing"], collective_timeout_s=600)
        join_world(cfg, "127.0.0.1", port, rank, world_size)
        trainer = Trainer(model_dir, cfg, AlgoConfig())
        samples = synthetic_samples(opts["trajectories"], vocab=1024, prompt_len=40, gen_len=opts["gen_len"],
                                    gen_spread=opts["gen_spread"], seed=1)
        trainer.train_step(samples)  # warm-up (allocator, first-call overheads)
        step_s, rows = [], []
        for _ in range(opts["steps"]):
            dist.barrier()
            start = time.perf_counter()
            rows.append(trainer.train_step(samples))
            dist.barrier()
            step_s.append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        state = gather_full_state_dict(trainer.model)
        gather_s = time.perf_counter() - start
        publish: dict[str, float] = {}
        if rank == 0:
            start = time.perf_counter()
            named = to_checkpoint_names(trainer.model, state)
            publish["rename_s"] = time.perf_counter() - start
            zmq_publisher = ZmqWeightPublisher(bucket_mb=64.0, dtype="bfloat16")
            start = time.perf_counter()
            zmq_publisher.publish(1, named)
            publish["zmq_encode_s"] = time.perf_counter() - start
            zmq_publisher.close()
            with tempfile.TemporaryDirectory(dir=opts["tmp"]) as tmp:
                start = time.perf_counter()
                FsWeightPublisher(tmp, bucket_mb=64.0, dtype="bfloat16").publish(1, named)
                publish["fs_write_s"] = time.perf_counter() - start
            publish["params"] = float(sum(t.numel() for t in named.values()))
        peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])  # MiB (Linux: KiB)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if rank == 0:
            tokens = sum(s.num_tokens for s in samples)
            best = min(step_s)
            queue.put({
                "ranks": world_size, "packing": opts["packing"], "params": publish["params"],
                "trajectories": len(samples), "tokens_per_step": tokens,
                "loss_tokens_per_step": int(sum(int(s.loss_mask.sum()) for s in samples)),
                "pad_frac": 1.0 - tokens / rows[-1]["model_tokens"], "micro_batches": rows[-1]["micro_batches"],
                "step_s": best, "step_s_all": step_s, "tokens_per_s": tokens / best,
                "gather_s": gather_s, **publish,
                "publish_total_s": gather_s + publish["rename_s"] + publish["zmq_encode_s"],
                "peak_rss_mib_max_rank": float(peak.item()),
            })
        dist.destroy_process_group()
    except BaseException as exc:  # the parent reports it instead of waiting
        queue.put({"error": f"rank {rank}: {type(exc).__name__}: {exc}"})
        raise


def run_config(model_dir: str, ranks: int, opts: dict[str, Any]) -> dict[str, Any]:
    from gpu_check import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=bench_rank, args=(r, ranks, port, model_dir, opts, queue)) for r in range(ranks)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=1800)
    finally:
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.terminate()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| ranks | packing | tokens/step | pad | micro-batches | step s | tokens/s | gather s | zmq encode s | "
             "fs write s | publish / step | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['ranks']} | {'yes' if r['packing'] else 'no'} | {r['tokens_per_step']} | "
            f"{100 * r['pad_frac']:.0f}% | "
            f"{r['micro_batches']:.0f} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['gather_s']:.3f} | "
            f"{r['zmq_encode_s']:.3f} | {r['fs_write_s']:.3f} | {100 * r['publish_total_s'] / r['step_s']:.1f}% | "
            f"{r['peak_rss_mib_max_rank']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--packing", choices=("true", "false", "both"), default="both")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up); the best is reported")
    parser.add_argument("--trajectories", type=int, default=64, help="trajectories per step (8 groups x 8)")
    parser.add_argument("--gen-len", type=int, default=40, help="minimum generated tokens per trajectory")
    parser.add_argument("--gen-spread", type=int, default=260, help="generated tokens vary over [gen_len, +spread)")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--docs", default="", help="append the markdown table to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gpu_check import build_tiny_vlm

    cache = ROOT / ".forage_cache"
    cache.mkdir(exist_ok=True)
    packings = {"true": [True], "false": [False], "both": [True, False]}[args.packing]
    results = []
    with tempfile.TemporaryDirectory(dir=cache, prefix="bench_learner_") as tmp:
        model_dir = str(build_tiny_vlm(Path(tmp) / "model", hidden=args.hidden, layers=args.layers))
        opts_base = {"steps": args.steps, "trajectories": args.trajectories, "gen_len": args.gen_len,
                     "gen_spread": args.gen_spread, "micro_batch_tokens": args.micro_batch_tokens, "tmp": tmp}
        for ranks in args.ranks:
            for packing in packings:
                result = run_config(model_dir, ranks, {**opts_base, "packing": packing})
                results.append(result)
                print(json.dumps(result), flush=True)
    text = table(results)
    print(text)
    if args.docs:
        command = "python bench/learner.py " + " ".join(sys.argv[1:])
        machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        params = results[0]["params"] / 1e6
        section = (f"\n## Learner run (bench/learner.py, hidden {args.hidden} x {args.layers})\n\n"
                   f"`{command}` on {machine} (shared, noisy); "
                   f"Qwen2.5-VL built from config, hidden {args.hidden} × {args.layers} layers, {params:.2f}M "
                   f"parameters; {args.trajectories} trajectories/step of {results[0]['tokens_per_step']} tokens; "
                   f"fp32, gloo, one torch thread per rank; best of {args.steps} steps after a warm-up. "
                   f"'publish / step' = (gather + checkpoint renaming + zmq bucket encoding) / step time.\n\n"
                   f"{text}\n")
        with open(args.docs, "a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
