"""TRL's KTOTrainer with fastalign's fused head: the bundled pairs as desirable (chosen) and
undesirable (rejected) completions, offline on the CPU.

    python examples/trl_kto.py
"""

import copy
import warnings

from datasets import Dataset
from trl import KTOConfig, KTOTrainer

import fastalign.integrations.trl as fatrl
from fastalign.trainer import byte_tokenizer, tiny_llama
from fastalign.trainer import demo_preferences

fatrl.enable()
rows = [dict(prompt=r["prompt"], completion=r[side], label=side == "chosen")
        for r in demo_preferences() for side in ("chosen", "rejected")]
model = tiny_llama()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer = KTOTrainer(
        model=model, ref_model=copy.deepcopy(model), processing_class=byte_tokenizer(),
        train_dataset=Dataset.from_list(rows),
        args=KTOConfig(output_dir="runs/trl_kto", per_device_train_batch_size=4, max_steps=6,
                       learning_rate=5e-4, logging_steps=2, report_to=[], use_cpu=True,
                       save_strategy="no", bf16=False))
trainer.train()
print("final loss:", [e["loss"] for e in trainer.state.log_history if "loss" in e][-1])
