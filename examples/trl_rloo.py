"""TRL's RLOOTrainer with fastalign's fused head (offline, CPU, a few steps).

    python examples/trl_rloo.py
"""

import warnings

from datasets import Dataset
from trl import RLOOConfig, RLOOTrainer

import fastalign.integrations.trl as fatrl
from fastalign.trainer import byte_tokenizer, tiny_llama


def distinct_letters(prompts, completions, **_):
    return [float(len(set(text))) for text in completions]


fatrl.enable()
# RLOO's default beta > 0: TRL loads its reference model from the policy's path.
policy_dir = "runs/tiny_policy"
tiny_llama(vocab_size=300).save_pretrained(policy_dir)
prompts = ["Tell me a story:", "What is rain?", "Pick a number:", "Hello there,"] * 4
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer = RLOOTrainer(
        model=policy_dir, reward_funcs=[distinct_letters],
        processing_class=byte_tokenizer(),
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        args=RLOOConfig(output_dir="runs/trl_rloo", per_device_train_batch_size=4,
                        num_generations=4, max_completion_length=16, max_steps=6,
                        learning_rate=1e-3, logging_steps=2, report_to=[], use_cpu=True,
                        save_strategy="no", bf16=False))
trainer.train()
print("last logged reward:", [e["reward"] for e in trainer.state.log_history if "reward" in e][-1])
