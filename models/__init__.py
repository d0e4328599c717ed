"""The model the actors and learner load: a local checkpoint, or a tiny Qwen2.5-VL built for the world and
warm-started on oracle episodes."""
from models.ensure import ModelConfig, check_model_path, ensure_model
from models.tiny import TinyModelConfig, build_tiny_model
from models.warmstart import WarmStartConfig, evaluate_warmstart, warm_start

__all__ = [
    "ModelConfig", "TinyModelConfig", "WarmStartConfig", "build_tiny_model", "check_model_path", "ensure_model",
    "evaluate_warmstart", "warm_start",
]
