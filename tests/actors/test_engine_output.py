"""The engine's pure parts: its process environment and how a vLLM RequestOutput becomes a TurnOutput."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import pytest

from actors.config import EngineConfig
from actors.engine import MAX_TMPDIR_CHARS, EngineError, _turn_output, engine_env, socket_tmpdir


def test_engine_env_keeps_everything_local(tmp_path):
    env = engine_env(EngineConfig(kv_cache_gib=1.5, env={"VLLM_LOGGING_LEVEL": "WARNING"}), tmp_path / "run",
                     tmp_path / "cache", on_cpu=True)
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["HF_HUB_OFFLINE"] == "1"
    assert Path(env["TMPDIR"]).is_relative_to(tmp_path / "run")
    assert Path(env["VLLM_CACHE_ROOT"]).is_relative_to(tmp_path / "cache")
    assert Path(env["TORCHINDUCTOR_CACHE_DIR"]).is_relative_to(tmp_path / "cache")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1.5" and env["VLLM_LOGGING_LEVEL"] == "WARNING"
    gpu = engine_env(EngineConfig(), tmp_path / "run", tmp_path / "cache", on_cpu=False)
    assert not any(k.startswith("VLLM_CPU") for k in gpu) and "VLLM_TARGET_DEVICE" not in gpu


def test_socket_tmpdir_stays_short_enough_for_ipc_paths(tmp_path):
    short = Path("/r")
    assert socket_tmpdir(short) == short / "tmp"
    deep = tmp_path / ("d" * 80)
    folder = socket_tmpdir(deep)
    try:
        assert folder.is_dir() and not folder.is_relative_to(deep)
        assert len(str(folder)) <= MAX_TMPDIR_CHARS and folder.name.startswith("forage-vllm-")
        assert len("ipc://" + str(folder / ("x" * 36))) <= 107  # vLLM's socket names fit a Unix socket path
    finally:
        folder.rmdir()


def _lp(token: int, value: float) -> dict:
    return {token: NS(logprob=value)}


def _output(tokens, logprobs, spans, prompt=(1, 2, 3)):
    completion = NS(token_ids=tokens, logprobs=logprobs, weight_versions=spans, finish_reason="stop",
                    stop_reason=tokens[-1] if tokens else None)
    return NS(request_id="r", prompt_token_ids=list(prompt), outputs=[completion], finished=True)


def test_turn_output_maps_logprobs_and_version_spans():
    spans = [NS(version="3", start=0, end=2), NS(version="4", start=2, end=3)]
    out = _turn_output(_output([7, 8, 9], [_lp(7, -0.1), _lp(8, -0.2), _lp(9, -0.3)], spans))
    assert out.token_ids == [7, 8, 9] and out.logprobs == [-0.1, -0.2, -0.3] and out.versions == [3, 3, 4]
    assert out.prompt_token_ids == [1, 2, 3] and out.finish_reason == "stop" and out.stop_reason == 9


@pytest.mark.parametrize("tokens, logprobs, spans, match", [
    ([7, 8], None, [NS(version="0", start=0, end=2)], "log-probs"),
    ([7, 8], [_lp(7, -0.1)], [NS(version="0", start=0, end=2)], "log-probs"),
    ([7, 8], [_lp(7, -0.1), _lp(5, -0.2)], [NS(version="0", start=0, end=2)], "sampled token 8"),
    ([7, 8], [_lp(7, -0.1), _lp(8, -0.2)], None, "no weight-version spans"),
    ([7, 8], [_lp(7, -0.1), _lp(8, -0.2)], [NS(version="0", start=0, end=1)], "cover 1 of 2"),
])
def test_turn_output_rejects_incomplete_outputs(tokens, logprobs, spans, match):
    with pytest.raises(EngineError, match=match):
        _turn_output(_output(tokens, logprobs, spans))
