"""The transformers Trainer (no TRL) with the loss from fastalign's fused head: patch_model
makes model(input_ids, labels=...) compute the causal-LM loss without the [B, T, V] logits.

    python examples/transformers_sft.py
"""

import warnings

from datasets import Dataset
from transformers import Trainer, TrainingArguments

from fastalign.integrations.transformers import patch_model
from fastalign.trainer import byte_tokenizer, tiny_llama
from fastalign.trainer import demo_preferences

tokenizer = byte_tokenizer()
rows = []
for row in demo_preferences():
    ids = tokenizer(row["prompt"] + " " + row["chosen"])["input_ids"][:128]
    ids += [tokenizer.pad_token_id] * (128 - len(ids))
    labels = [-100 if t == tokenizer.pad_token_id else t for t in ids]
    rows.append({"input_ids": ids, "labels": labels})

model = patch_model(tiny_llama())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trainer = Trainer(model=model, train_dataset=Dataset.from_list(rows),
                      args=TrainingArguments(output_dir="runs/transformers_sft",
                                             per_device_train_batch_size=4, max_steps=8,
                                             learning_rate=1e-3, logging_steps=2, report_to=[],
                                             use_cpu=True, save_strategy="no"))
trainer.train()
print("final loss:", [e["loss"] for e in trainer.state.log_history if "loss" in e][-1])
