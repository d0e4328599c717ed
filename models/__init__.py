"""The model the actors and learner load: a local checkpoint, or a tiny Qwen2.5-VL built for the world. Builds,
loads and saves models only: the warm start that trains the tiny model is the learner's SFT, run by the launcher."""
from models.ensure import ModelConfig, check_model_path, ensure_base_model
from models.tiny import TinyModelConfig, build_tiny_model

__all__ = ["ModelConfig", "TinyModelConfig", "build_tiny_model", "check_model_path", "ensure_base_model"]
