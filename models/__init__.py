"""The model the actors and learner load: a local checkpoint, or a tiny Qwen2.5-VL built for the world and
warm-started by the learner's SFT on oracle episodes (learner/sft.py)."""
from models.ensure import ModelConfig, check_model_path, ensure_model, warm_start_cached
from models.tiny import TinyModelConfig, build_tiny_model
from models.warmstart import evaluate_warmstart

__all__ = [
    "ModelConfig", "TinyModelConfig", "build_tiny_model", "check_model_path", "ensure_model", "evaluate_warmstart",
    "warm_start_cached",
]
