"""Model preparation: loading by name (``loading``: tiny, smollm2, .gguf, directories), the
built-in tiny models and tokenizer (``tiny``, ``tokenizer``, ``sft``: their warm start), LoRA
(``lora``, ``merge``), and the adapter that turns a causal LM into completion log-probs
(``adapter``, ``packing``)."""
