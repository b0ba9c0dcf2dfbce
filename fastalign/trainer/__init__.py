"""The thin trainer layer: runs Hugging Face causal LMs through fastalign's fused ops.

``CausalLMAdapter`` turns a model into completion-token log-probs without materializing logits;
``DPOTrainer``, ``RewardTrainer``, ``PPOTrainer``, ``GRPOTrainer`` and ``DistillTrainer`` train
with them,
``best_of_n`` samples and keeps the best; ``tiny_llama`` and ``byte_tokenizer`` are the built-in
default model (no downloads)."""

from .models.adapter import CausalLMAdapter, completion_targets
from .algorithms.best_of_n import BestOfN, best_of_n
from .core.bundled import demo_preferences
from .core.checkpoint import CheckpointError
from .core.config import TrainConfig
from .core.data import DataError, load_preferences, tokenize_pairs
from .algorithms.distill import DistillConfig, DistillTrainer
from .algorithms.dpo import DPOConfig, DPOTrainer
from .algorithms.grpo import GRPOConfig, GRPOTrainer
from .algorithms.ppo import PPOConfig, PPOTrainer
from .algorithms.reward import RewardConfig, RewardTrainer
from .models.merge import merge_adapter
from .models.loading import load_model_and_tokenizer, load_reward_model
from .models.tiny import tiny_llama, tiny_reward_model
from .models.tokenizer import byte_tokenizer

__all__ = ["BestOfN", "CausalLMAdapter", "CheckpointError", "DPOConfig", "DPOTrainer",
           "DataError", "DistillConfig", "DistillTrainer", "GRPOConfig", "GRPOTrainer", "PPOConfig", "PPOTrainer", "RewardConfig",
           "RewardTrainer", "TrainConfig", "best_of_n", "byte_tokenizer", "completion_targets",
           "demo_preferences", "load_model_and_tokenizer", "load_preferences",
           "load_reward_model", "merge_adapter", "tiny_llama", "tiny_reward_model",
           "tokenize_pairs"]
