"""The algorithms: DPO (``dpo``), reward models (``reward``), GRPO (``grpo``), PPO (``ppo``),
Best-of-N (``best_of_n``), and what the RL ones share: sampling (``rollout``) and reward
functions (``rewards``). Each trainer module declares its ``SPEC`` (``trainer/registry.py``)."""
