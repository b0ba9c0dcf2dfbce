"""TRL's DPOTrainer with fastalign's fused head: one line before the trainer is built.

Runs offline on the CPU in about a minute: the built-in tiny Llama (128k vocabulary), the
bundled preference pairs, a frozen reference copy, 8 steps.

    python examples/trl_dpo.py
"""

import copy
import warnings

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import fastalign.integrations.trl as fatrl
from fastalign.trainer import byte_tokenizer, tiny_llama
from fastalign.trainer import demo_preferences

fatrl.enable()  # every TRL trainer built from here on computes its log-probs through fastalign

model = tiny_llama()
pairs = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in demo_preferences()]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # TRL's notes about the tiny model's missing chat template
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), processing_class=byte_tokenizer(),
        train_dataset=Dataset.from_list(pairs),
        args=DPOConfig(output_dir="runs/trl_dpo", per_device_train_batch_size=4, max_steps=8,
                       learning_rate=5e-4, logging_steps=2, report_to=[], use_cpu=True,
                       save_strategy="no", bf16=False))
trainer.train()
print("final reward accuracy:", trainer.state.log_history[-2].get("rewards/accuracies"))
