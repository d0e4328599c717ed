"""Checks that vLLM (CPU) loads the tiny model folder and generates from images: prints start-up time, whether
greedy turns follow the tag format, and how often they match transformers' greedy output token for token.

    PYTHONPATH=. .venv/bin/python bench/check_tiny_model_vllm.py [--model DIR] [--cache-dir .forage_cache]

Without --model it builds (or reuses) the default world and warm-started tiny model under --cache-dir.
"""
from __future__ import annotations

import argparse
import base64
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("check_tiny_model_vllm")

# Python puts this script's folder first on sys.path, where bench/actors.py would shadow the actors package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def _engine_env(run_dir: Path) -> None:
    # ENV.md: keep vLLM's caches and sockets inside a directory we own, loopback only, no telemetry.
    for sub in ("vllm", "inductor", "tmp"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CACHE_ROOT": str(run_dir / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor"),
        "TMPDIR": str(run_dir / "tmp"),
    })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: build the warm-started tiny model)")
    parser.add_argument("--cache-dir", default=".forage_cache", help="world/model cache and vLLM scratch space")
    parser.add_argument("--per-kind", type=int, default=2, help="test questions per kind")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cache = Path(args.cache_dir).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    _engine_env(Path(tempfile.mkdtemp(prefix="vllm-check-", dir=cache)))

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from episode import prompts
    from protocol.images import decode_image
    from data.world import KINDS, WorldConfig, ensure_world, load_world
    from episode.turns import ORACLE_TURN_RE
    from launcher.warm_start import ensure_model
    from models.ensure import ModelConfig

    torch.set_num_threads(1)
    world_paths = ensure_world(WorldConfig(), cache)
    start = time.monotonic()
    model_dir = Path(args.model) if args.model else ensure_model(ModelConfig(), world_paths, cache)
    print(f"model folder: {model_dir} (ready in {time.monotonic() - start:.1f}s)")

    from vllm import LLM, SamplingParams

    start = time.monotonic()
    llm = LLM(model=str(model_dir), enforce_eager=True, dtype="float32", max_model_len=2048, seed=0,
              limit_mm_per_prompt={"image": 8})
    startup = time.monotonic() - start
    print(f"vLLM start-up: {startup:.1f}s")

    processor = AutoProcessor.from_pretrained(model_dir)
    hf_model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    world = load_world(world_paths)
    rows = [r for kind in KINDS for r in [q for q in world.questions if q["split"] == "test" and q["kind"] == kind]
            [: args.per_kind]]
    texts = [processor.apply_chat_template([prompts.first_user_message(r["question"])], tokenize=False,
                                           add_generation_prompt=True) for r in rows]
    params = SamplingParams(temperature=0.0, max_tokens=48, stop=list(prompts.TURN_STOPS),
                            include_stop_str_in_output=True)
    start = time.monotonic()
    outputs = llm.generate([{"prompt": t, "multi_modal_data": {"image": [decode_image(r["image"])]}}
                            for t, r in zip(texts, rows)], params)
    print(f"vLLM generate ({len(rows)} prompts): {time.monotonic() - start:.2f}s")

    stop_ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in (*prompts.TURN_STOPS, "<|im_end|>")]
    formatted = matched = 0
    for row, text, out in zip(rows, texts, outputs):
        vllm_text = out.outputs[0].text
        enc = processor(text=[text], images=[decode_image(row["image"])], return_tensors="pt")
        with torch.no_grad():
            hf_ids = hf_model.generate(**enc, max_new_tokens=48, do_sample=False, eos_token_id=stop_ids)
        hf_text = processor.tokenizer.decode(hf_ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        formatted += ORACLE_TURN_RE.match(vllm_text.strip()) is not None
        matched += hf_text.strip() == vllm_text.strip()
        print(f"[{row['kind']}] {row['question']} -> {vllm_text!r}" + ("" if hf_text.strip() == vllm_text.strip()
                                                                      else f"  (transformers: {hf_text!r})"))
    print(f"tag format: {formatted}/{len(rows)}; vLLM == transformers greedy: {matched}/{len(rows)}")

    # The chat path: vLLM applies the folder's chat template to OpenAI-style image parts.
    url = "data:image/png;base64," + base64.b64encode(rows[0]["image"]).decode()
    content = [{"type": "image_url", "image_url": {"url": url}},
               {"type": "text", "text": prompts.first_user_text(rows[0]["question"])}]
    chat = llm.chat([{"role": "user", "content": content}], params)
    chat_text = chat[0].outputs[0].text
    print(f"llm.chat -> {chat_text!r} (same as generate: {chat_text == outputs[0].outputs[0].text})")
    ok = formatted == len(rows) and chat_text == outputs[0].outputs[0].text
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
