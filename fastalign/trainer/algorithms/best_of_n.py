"""Best-of-N sampling: draw ``n`` completions per prompt from the policy, score them with reward
functions or a reward model, keep the best. No training; the baseline every RL method should
beat at equal sampling cost."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rollout import generate_rollouts, prompt_text, score_completions


@dataclass
class BestOfN:
    """Per prompt: the best completion and its reward; ``mean_reward`` (all samples, i.e. what
    N = 1 gets on average) and ``best_reward`` (mean over prompts of each prompt's best)."""
    completions: list[str]
    rewards: list[float]
    mean_reward: float
    best_reward: float

    @property
    def gain(self) -> float:
        """How much keeping the best of N adds over one sample, in reward units."""
        return self.best_reward - self.mean_reward


def score_with_reward_model(reward_model, tokenizer, prompts: list, completions: list[str],
                            *, batch_size: int = 16) -> torch.Tensor:
    """``[len(completions)]`` scores of ``prompt + completion`` by a sequence-classification
    reward model with one output (e.g. trained by ``RewardTrainer``); prompts repeat to match."""
    from ..core.data import _ids, _pad

    device = next(reward_model.parameters()).device
    rows = [(_ids(tokenizer, prompt_text(p)), tokenizer(c, add_special_tokens=False)["input_ids"])
            for p, c in zip(prompts, completions)]
    scores = []
    reward_model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = _pad(rows[start:start + batch_size], tokenizer.pad_token_id)
            logits = reward_model(input_ids=batch["input_ids"].to(device),
                                  attention_mask=batch["attention_mask"].to(device)).logits
            scores.append(logits.squeeze(-1).float().cpu())
    return torch.cat(scores)


def check_reward_model(model, name: str = "reward_model") -> None:
    if getattr(getattr(model, "config", None), "num_labels", None) != 1:
        raise ValueError(f"{name} must be a sequence-classification model with one output "
                         "(num_labels=1), e.g. trained by RewardTrainer")


class RewardModelFunction:
    """A reward model as a reward function ``f(prompts, completions) -> list[float]`` (frozen,
    scored with ``score_with_reward_model`` through its own ``tokenizer``)."""

    __name__ = "reward_model"

    def __init__(self, model, tokenizer):
        check_reward_model(model)
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer

    def __call__(self, prompts: list, completions: list[str]) -> list[float]:
        return score_with_reward_model(self.model, self.tokenizer, prompts, completions).tolist()


def best_of_n(policy, tokenizer, prompts: list, *, n: int, reward_funcs: list | None = None,
              reward_model=None, reward_tokenizer=None, max_new_tokens: int = 64,
              temperature: float = 1.0, top_p: float = 1.0,
              prompts_per_batch: int = 16) -> BestOfN:
    """Samples ``n`` completions of each prompt and keeps the highest-reward one. Rewards come
    from ``reward_funcs`` (``f(prompts, completions) -> list[float]``, summed) or a
    ``reward_model`` (with its own ``reward_tokenizer``, default ``tokenizer``). Generation
    runs ``prompts_per_batch`` prompts (x ``n`` rows) at a time.

    Raises:
        ValueError: neither or both reward sources, or ``n`` or ``prompts_per_batch`` < 1.
    """
    if (reward_funcs is None) == (reward_model is None):
        raise ValueError("pass exactly one of reward_funcs and reward_model")
    if n < 1 or prompts_per_batch < 1:
        raise ValueError(f"n and prompts_per_batch must be >= 1, got {n} and "
                         f"{prompts_per_batch}")
    samples = []
    for start in range(0, len(prompts), prompts_per_batch):
        samples += generate_rollouts(policy, tokenizer, prompts[start:start + prompts_per_batch],
                                     num_generations=n, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p,
                                     logprobs=False).completions
    repeated = [prompt for prompt in prompts for _ in range(n)]
    if reward_model is not None:
        rewards = score_with_reward_model(reward_model, reward_tokenizer or tokenizer, repeated,
                                          samples)
    else:
        rewards = score_completions(reward_funcs, repeated, samples)
    grouped = rewards.view(len(prompts), n)
    best = grouped.argmax(-1)
    completions = [samples[i * n + j] for i, j in enumerate(best.tolist())]
    return BestOfN(completions, grouped.max(-1).values.tolist(), float(rewards.mean()),
                   float(grouped.max(-1).values.mean()))
