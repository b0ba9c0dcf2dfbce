"""TRL's SFTTrainer with fastalign's fused head: supervised fine-tuning of the tiny Llama on the
bundled chosen answers, offline on the CPU.

    python examples/trl_sft.py
"""

import warnings

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import fastalign.integrations.trl as fatrl
from fastalign.trainer import byte_tokenizer, tiny_llama
from fastalign.trainer import demo_preferences

fatrl.enable()
texts = [{"text": r["prompt"] + " " + r["chosen"]} for r in demo_preferences()]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer = SFTTrainer(
        model=tiny_llama(), processing_class=byte_tokenizer(),
        train_dataset=Dataset.from_list(texts),
        args=SFTConfig(output_dir="runs/trl_sft", per_device_train_batch_size=4, max_steps=8,
                       learning_rate=1e-3, logging_steps=2, report_to=[], use_cpu=True,
                       save_strategy="no", bf16=False, max_length=256))
trainer.train()
print("final loss:", [e["loss"] for e in trainer.state.log_history if "loss" in e][-1])
