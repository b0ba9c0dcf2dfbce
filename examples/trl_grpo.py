"""TRL's GRPOTrainer with fastalign's fused head, offline on the CPU: the tiny Llama learns to
answer in lowercase letters (a rule reward), 4 completions per prompt, 6 steps.

    python examples/trl_grpo.py
"""

import warnings

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import fastalign.integrations.trl as fatrl
from fastalign.trainer import byte_tokenizer, tiny_llama


def lowercase_share(prompts, completions, **_):
    return [sum(c.islower() for c in text) / max(len(text), 1) for text in completions]


# With beta > 0 TRL loads its reference model from the policy's path: save the tiny model first.
policy_dir = "runs/tiny_policy"
tiny_llama(vocab_size=300).save_pretrained(policy_dir)
prompts = ["Say something nice:", "Name a color:", "Describe the sea:", "Count to three:"] * 4
with fatrl.enabled():  # only the trainers built inside use fastalign's head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(
            model=policy_dir, reward_funcs=[lowercase_share],
            processing_class=byte_tokenizer(),
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            args=GRPOConfig(output_dir="runs/trl_grpo", per_device_train_batch_size=4,
                            num_generations=4, max_completion_length=16, max_steps=6,
                            learning_rate=1e-3, temperature=0.9, beta=0.04, logging_steps=2,
                            report_to=[], use_cpu=True, save_strategy="no", bf16=False))
trainer.train()
print("last logged reward:", [e["reward"] for e in trainer.state.log_history if "reward" in e][-1])
