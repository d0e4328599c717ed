"""GPU check of the learner: the loss functions on CUDA against CPU, and FSDP2 in bf16 over NCCL on one GPU against
a CPU fp32 reference (log-probs, first-step loss and gradient norm, a few steps, gather, DCP save/load), with timings.

Self-contained: builds its own tiny Qwen2.5-VL from config (no tokenizer, no downloads, no forage caches) and needs
only torch, transformers, numpy, pillow and safetensors (no msgspec/pyzmq: it imports learner.trainer/losses/
packing/checkpoint/config only). Run from the repository root:

    python bench/gpu_check.py --device cuda --out $OUT     # on the GPU machine
    python bench/gpu_check.py --device cpu                 # here: the same code path with CPU bf16 as "device"

Prints one JSON line per section and `GPU CHECK: PASS` or `GPU CHECK: FAIL (...)`; exit status 0 only on PASS.
Writes gpu_check.json into --out when given.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

IMAGE_TOKEN, VISION_START, VISION_END, PAD, EOS, VIDEO = 5, 3, 4, 0, 2, 6
FIRST_TEXT_ID = 8


# ---------------------------------------------------------------------------------------------- the tiny model

def build_tiny_vlm(path: Path, hidden: int = 128, layers: int = 2, vocab: int = 1024, vision_hidden: int = 128,
                   vision_depth: int = 2, seed: int = 0) -> Path:
    """Save a Qwen2.5-VL built from config (random weights, tied embeddings) and a 56×56-friendly image processor
    config into `path`. Sizes default to the embedded tiny model's (models/tiny.py)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = max(2, hidden // 32)
    half = (hidden // heads) // 2
    t = half // 4
    h = (half - t) // 2
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [t, h, half - t - h]},
                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=max(2, vision_hidden // 32), out_hidden_size=hidden, window_size=56,
                           fullatt_block_indexes=[vision_depth - 1]),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    try:  # transformers >= 5.19 names the PIL processor separately; older 5.x have only the default one
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as Processor
    except ImportError:
        from transformers import Qwen2VLImageProcessor as Processor
    Processor(min_pixels=56 * 56, max_pixels=56 * 56 * 4).save_pretrained(path)
    return path


def png(color: tuple[int, int, int], side: int = 56) -> bytes:
    from PIL import Image

    from protocol.images import encode_png

    return encode_png(Image.new("RGB", (side, side), color))


def synthetic_samples(n: int, vocab: int, prompt_len: int = 40, gen_len: int = 80, gen_spread: int = 40,
                      seed: int = 0) -> list:
    """`n` trajectories like the actors send: [im_start?, vision_start, 4 image pads, vision_end] + prompt text, then
    gen_len + U[0, gen_spread) generated tokens (loss mask 1) with behaviour log-probs; every other one has a 56×56
    image."""
    from learner.packing import Sample

    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        with_image = i % 2 == 0
        prompt = [1] + ([VISION_START] + [IMAGE_TOKEN] * 4 + [VISION_END] if with_image else [])
        prompt += rng.integers(FIRST_TEXT_ID, vocab, prompt_len + int(rng.integers(0, 20))).tolist()
        generated = rng.integers(FIRST_TEXT_ID, vocab, gen_len + int(rng.integers(0, gen_spread))).tolist()
        ids = np.array(prompt + generated, dtype=np.int64)
        mask = np.array([0] * len(prompt) + [1] * len(generated), dtype=bool)
        behav = np.where(mask, -rng.uniform(5.0, 8.0, len(ids)), 0.0).astype(np.float32)
        samples.append(Sample(group_id=f"g{i // 4}", input_ids=ids, loss_mask=mask, behav_logp=behav,
                              versions=np.where(mask, 0, -1).astype(np.int32), advantage=float(rng.normal()),
                              images=[png(tuple(int(c) for c in rng.integers(0, 255, 3)))] if with_image else []))
    return samples


# ------------------------------------------------------------------------------------------------- sections

def section_env(device: torch.device) -> dict[str, Any]:
    import transformers

    out: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": sys.version.split()[0], "device": str(device)}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device), bf16=torch.cuda.is_bf16_supported(),
                   nccl=str(torch.cuda.nccl.version()), memory_gb=round(
                       torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return out


def section_losses(device: torch.device) -> dict[str, Any]:
    """Every loss variant, the KL estimators, entropy and aggregation on `device` vs CPU (fp32, same inputs)."""
    from dataclasses import replace

    from learner.config import AlgoConfig
    from learner.losses import aggregate, entropy_from_logits, kl_penalty, policy_loss

    gen = torch.Generator().manual_seed(0)
    B, T = 6, 32
    prox = -torch.rand(B, T, generator=gen) * 4
    logp = prox + torch.randn(B, T, generator=gen) * 0.3
    behav = prox - torch.randn(B, T, generator=gen) * 0.5
    logp[0, 3], behav[1, 4] = prox[0, 3] + 40.0, prox[1, 4] - 40.0  # extreme ratios
    adv = torch.randn(B, generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    mask[2] = False  # an all-masked sequence
    ref = prox + torch.randn(B, T, generator=gen) * 0.2
    worst: dict[str, float] = {}

    def run(tensors: list[torch.Tensor], fn: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        x = tensors[0].clone().requires_grad_(True)
        value = fn(x, *tensors[1:])
        value.backward()
        return value.detach().cpu().double(), x.grad.detach().cpu().double()

    def compare(name: str, fn: Callable, tensors: list[torch.Tensor]) -> None:
        cpu_value, cpu_grad = run(tensors, fn)
        dev_value, dev_grad = run([t.to(device) for t in tensors], fn)
        if not (torch.isfinite(dev_value).all() and torch.isfinite(dev_grad).all()):
            raise AssertionError(f"{name}: non-finite on {device}")
        scale = max(1.0, float(cpu_value.abs().max()))
        worst[name] = max(float((cpu_value - dev_value).abs().max()) / scale, float((cpu_grad - dev_grad).abs().max()))

    base = AlgoConfig()
    for correction in ("decoupled", "decoupled_mis", "bypass", "naive"):
        for agg in ("token_mean", "seq_mean_token_mean"):
            for dual in (None, 3.0):
                cfg = replace(base, correction=correction, agg=agg, dual_clip=dual)
                compare(f"{correction}/{agg}/dual={dual}",
                        lambda x, p, b, a, m, cfg=cfg: policy_loss(x, p, b, a, m, cfg)[0],
                        [logp, prox, behav, adv, mask])
    for kind in ("low_var_kl", "kl", "mse", "abs"):
        compare(f"kl/{kind}", lambda x, r, m, kind=kind: aggregate(kl_penalty(x, r, kind, m), m, "token_mean"),
                [logp, ref, mask])
    logits = torch.randn(B, T, 1000, generator=gen) * 3
    compare("entropy", lambda z: entropy_from_logits(z).sum(), [logits])
    bad = logp.clone()
    bad[3, 0] = float("nan")
    mask_bad = mask.clone()
    mask_bad[3, 0] = True
    try:
        policy_loss(bad.to(device), prox.to(device), behav.to(device), adv.to(device), mask_bad.to(device), base)
        raise AssertionError("NaN under the mask did not raise on the device")
    except ValueError:
        pass
    limit = max(worst.values())
    if limit > 1e-5:
        raise AssertionError(f"device differs from CPU by {limit:.2e} (> 1e-5): {worst}")
    return {"cases": len(worst), "max_rel_diff": limit}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_world(backend: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore("127.0.0.1", free_port(), 1, True)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def train_run(model_dir: Path, samples: list, device: torch.device, precision: str, backend: str, steps: int,
              checkpoint_root: Path | None, packing: bool = True) -> dict[str, Any]:
    """One 1-rank FSDP2 world: masked log-probs of the first micro-batch, `steps` train steps on the same batch,
    a full gather, and (optionally) a DCP save → step → load → same step check."""
    import torch.distributed as dist

    from learner.checkpoint import LearnerState
    from learner.config import AlgoConfig, LearnerConfig
    from learner.trainer import Trainer, forward_logprobs

    init_world(backend)
    try:
        learner = LearnerConfig(world_size=1, lr=1e-3, micro_batch_tokens=4096, backend=backend,
                                precision=precision, packing=packing)
        trainer = Trainer(str(model_dir), learner, AlgoConfig(), device)
        batch = trainer.collator(samples[:8])
        with torch.no_grad():
            logp, entropy = forward_logprobs(trainer.model, batch, device, trainer.compute_dtype)
        out: dict[str, Any] = {"logp": logp[batch.loss_mask.to(device)].float().cpu(),
                               "entropy": entropy[batch.loss_mask.to(device)].float().cpu()}
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        rows, times = [], []
        for _ in range(steps):
            start = time.perf_counter()
            rows.append(trainer.train_step(samples))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        tokens = sum(s.num_tokens for s in samples)
        out.update(rows=rows, step_s=times, tokens_per_s=tokens / min(times))
        if device.type == "cuda":
            out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        start = time.perf_counter()
        full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        out["gather_s"] = time.perf_counter() - start
        out["params"] = sum(v.numel() for v in full.values())
        if checkpoint_root is not None:
            start = time.perf_counter()
            trainer.save(str(checkpoint_root), trainer.steps, LearnerState(version=trainer.steps, steps=trainer.steps),
                         b"", keep=1)
            out["checkpoint_save_s"] = time.perf_counter() - start
            trainer.train_step(samples)
            after = {k: v.clone() for k, v in get_model_state_dict(
                trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)).items()}
            start = time.perf_counter()
            trainer.load(sorted(checkpoint_root.iterdir())[-1])
            out["checkpoint_load_s"] = time.perf_counter() - start
            trainer.train_step(samples)
            again = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
            out["resume_max_diff"] = max(float((after[k].float() - again[k].float()).abs().max()) for k in after)
        return out
    finally:
        dist.destroy_process_group()


def section_fsdp(device: torch.device, steps: int, hidden: int, layers: int, work: Path) -> dict[str, Any]:
    """FSDP2 bf16 on the device (NCCL on CUDA; gloo for --device cpu) against CPU fp32 with gloo."""
    model_dir = build_tiny_vlm(work / "model", hidden=hidden, layers=layers)
    samples = synthetic_samples(32, vocab=1024)
    # The reference pads; the device run packs (and a second device run pads), so one comparison covers bf16 vs
    # fp32, NCCL vs gloo and packed vs padded attention on the device.
    reference = train_run(model_dir, samples, torch.device("cpu"), "fp32", "gloo", 1, None, packing=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    run = train_run(model_dir, samples, device, "bf16", backend, steps, work / "ckpt", packing=True)
    padded = train_run(model_dir, samples, device, "bf16", backend, 1, None, packing=False)
    logp_diff = (reference["logp"] - run["logp"]).abs()
    first, ref_first = run["rows"][0], reference["rows"][0]
    result = {
        "backend": backend, "params": run["params"], "tokens_per_step": sum(s.num_tokens for s in samples),
        "logp_mean_abs_diff": float(logp_diff.mean()), "logp_max_abs_diff": float(logp_diff.max()),
        "entropy_mean_abs_diff": float((reference["entropy"] - run["entropy"]).abs().mean()),
        "loss_step1": first["loss"], "loss_step1_cpu_fp32": ref_first["loss"],
        "grad_norm_step1": first["grad_norm"], "grad_norm_step1_cpu_fp32": ref_first["grad_norm"],
        "losses": [r["loss"] for r in run["rows"]], "step_s": run["step_s"], "tokens_per_s": run["tokens_per_s"],
        "tokens_per_s_cpu_fp32": reference["tokens_per_s"], "gather_s": run["gather_s"],
        "checkpoint_save_s": run["checkpoint_save_s"], "checkpoint_load_s": run["checkpoint_load_s"],
        "resume_max_diff": run["resume_max_diff"], "peak_memory_mb": run.get("peak_memory_mb"),
        "packed_vs_padded_logp_mean_abs_diff": float((padded["logp"] - run["logp"]).abs().mean()),
        "tokens_per_s_padded": padded["tokens_per_s"],
    }
    problems = []
    if not all(np.isfinite(result["losses"])) or not np.isfinite(first["grad_norm"]):
        problems.append("non-finite loss or gradient norm")
    if result["logp_mean_abs_diff"] > 0.05 or result["logp_max_abs_diff"] > 0.5:
        problems.append(f"bf16 log-probs differ from fp32 by mean {result['logp_mean_abs_diff']:.3g} / max "
                        f"{result['logp_max_abs_diff']:.3g}")
    if abs(first["grad_norm"] - ref_first["grad_norm"]) > 0.1 * ref_first["grad_norm"]:
        problems.append(f"step-1 grad norm {first['grad_norm']:.4g} vs fp32 {ref_first['grad_norm']:.4g}")
    if abs(first["loss"] - ref_first["loss"]) > 0.05 * max(1.0, abs(ref_first["loss"])):
        problems.append(f"step-1 loss {first['loss']:.4g} vs fp32 {ref_first['loss']:.4g}")
    if result["packed_vs_padded_logp_mean_abs_diff"] > 0.05:
        problems.append(f"packed and padded bf16 log-probs differ by {result['packed_vs_padded_logp_mean_abs_diff']:.3g}")
    if result["resume_max_diff"] > 1e-3:
        problems.append(f"a step after a DCP reload differs by {result['resume_max_diff']:.3g}")
    if problems:
        raise AssertionError("; ".join(problems) + f" | {json.dumps(result, default=str)}")
    return result


# ------------------------------------------------------------------------------------------------------ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=3, help="bf16 train steps on the device")
    parser.add_argument("--hidden", type=int, default=128, help="text width of the tiny model")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the tiny model")
    parser.add_argument("--out", default="", help="folder for gpu_check.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("GPU CHECK: FAIL (torch sees no CUDA device; use --device cpu to test the script here)")
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    report: dict[str, Any] = {}
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("env", lambda: section_env(device)),
            ("losses", lambda: section_losses(device)),
            ("fsdp_bf16", lambda: section_fsdp(device, args.steps, args.hidden, args.layers, Path(tmp))),
        ]
        for name, section in sections:
            start = time.perf_counter()
            try:
                result = {"ok": True, **section()}
            except Exception as exc:  # report every section, then fail at the end
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
                failures.append(name)
            result["seconds"] = round(time.perf_counter() - start, 2)
            report[name] = result
            print(json.dumps({"section": name, **{k: v for k, v in result.items() if k != "trace"}}, default=str),
                  flush=True)
            if not result["ok"]:
                print(result["trace"], file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print("GPU CHECK: PASS" if not failures else f"GPU CHECK: FAIL ({', '.join(failures)})", flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
