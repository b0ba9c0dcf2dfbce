"""The thin trainer layer: runs Hugging Face causal LMs through fastalign's fused ops.

``CausalLMAdapter`` turns a model into completion-token log-probs without materializing logits;
``DPOTrainer`` and ``RewardTrainer`` train with them; ``tiny_llama`` and ``byte_tokenizer`` are
the built-in default model (no downloads)."""

from .adapter import CausalLMAdapter, completion_targets
from .checkpoint import CheckpointError
from .config import DPOConfig, GRPOConfig, RewardConfig, TrainConfig
from .data import DataError, load_preferences, tokenize_pairs
from .dpo import DPOTrainer
from .grpo import GRPOTrainer
from .reward import RewardTrainer, tiny_reward_model
from .tiny import load_model_and_tokenizer, tiny_llama
from .tokenizer import byte_tokenizer

__all__ = ["CausalLMAdapter", "CheckpointError", "DPOConfig", "DPOTrainer", "DataError",
           "GRPOConfig", "GRPOTrainer",
           "RewardConfig", "RewardTrainer", "TrainConfig", "byte_tokenizer", "completion_targets",
           "load_model_and_tokenizer", "load_preferences", "tiny_llama", "tiny_reward_model",
           "tokenize_pairs"]
