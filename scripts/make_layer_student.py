"""A smaller student built from a model by keeping every k-th decoder layer (the layers
``k-1, 2k-1, ...``: the last one is always kept, since it feeds the final norm and the head),
saved as a plain Hugging Face directory that ``--model DIR`` loads. The embeddings, final norm
and head are the teacher's, so both share the tokenizer and vocabulary, as distillation needs.

    python scripts/make_layer_student.py smollm2 runs/smollm2-every3 --every 3
    fastalign train distill --model runs/smollm2-every3 --teacher smollm2 ...

SmolLM2-135M-Instruct has 30 layers; ``--every 3`` keeps 10 (layers 2, 5, ..., 29): 134.5M ->
63.7M parameters (the tied 49152 x 576 embedding is 28.3M of both).
"""

from __future__ import annotations

import argparse

import torch


def keep_every(model, every: int) -> list[int]:
    """Cuts ``model`` (a Llama-style causal LM) down to every ``every``-th decoder layer, in
    place; returns the kept layers' original indices."""
    layers = model.model.layers
    kept = list(range(every - 1, len(layers), every))
    if kept[-1] != len(layers) - 1:
        kept.append(len(layers) - 1)
    model.model.layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.model.layers):
        # The KV cache is indexed by each attention's layer_idx: renumber them.
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    return kept


def main() -> None:
    from fastalign.trainer.models.loading import load_model_and_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="'smollm2', a .gguf file or a model directory")
    parser.add_argument("output", help="a new directory")
    parser.add_argument("--every", type=int, default=3, help="keep every k-th layer (k >= 2)")
    args = parser.parse_args()
    if args.every < 2:
        parser.error("--every must be >= 2 (1 keeps the whole model)")
    model, tokenizer = load_model_and_tokenizer(args.model)
    before = sum(p.numel() for p in model.parameters())
    kept = keep_every(model, args.every)
    after = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"kept layers {kept} of {args.model}: {before / 1e6:.1f}M -> {after / 1e6:.1f}M "
          f"parameters, saved in {args.output}")


if __name__ == "__main__":
    main()
