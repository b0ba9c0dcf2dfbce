"""The built-in demo (``fastalign demo``, the README's first command): DPO training of a tiny
Llama with a 128256-token vocabulary on the bundled preference pairs, on the CPU (75 s on 2
cores), with no download.

    python -m fastalign.demo                  # 20 steps of 8 pairs, output in ./fastalign-demo
    python -m fastalign.demo --steps 40 --output /tmp/run

The pairs (``fastalign/data/demo_preferences.jsonl``) teach a tone: polite, on-topic answers
are preferred to curt ones; 10 topics are held out of training. The demo prints the held-out
accuracy before and after training, then the peak memory of one DPO forward + backward through
fastalign's fused path beside the unfused one (logits + float32 log_softmax), same batch.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import fastalign
from fastalign import _measure
from fastalign.trainer.core.bundled import BUNDLED_PREFERENCES

MEMORY_PAIRS = 8


def _model_and_data(hidden: int, layers: int, max_pairs: int | None = None):
    from fastalign.trainer import demo_preferences, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny", hidden_size=hidden, num_layers=layers)
    train = demo_preferences("train")[:max_pairs]
    held_out = demo_preferences("test")[:max_pairs and max(1, max_pairs // 3)]
    return model, tokenizer, train, held_out


def _memory_worker(spec: dict) -> dict:
    """Peak extra memory of one DPO forward + backward (reference log-probs given) in this
    fresh process, through the fused path or the unfused one."""
    from fastalign.losses import dpo_loss
    from fastalign.trainer import CausalLMAdapter, tokenize_pairs
    from fastalign.trainer.core.data import collate_pairs

    model, tokenizer, train, _ = _model_and_data(spec["hidden"], spec["layers"])
    pairs = tokenize_pairs(train[:MEMORY_PAIRS], tokenizer)
    chosen, rejected = collate_pairs(pairs, tokenizer.pad_token_id)
    reference = torch.zeros(MEMORY_PAIRS)
    adapter = CausalLMAdapter(model)

    def unfused_logps(side):
        logits = model(input_ids=side["input_ids"], attention_mask=side["attention_mask"]).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = logprobs.gather(-1, side["input_ids"][:, 1:, None]).squeeze(-1)
        mask = side["completion_mask"][:, 1:] * side["attention_mask"][:, 1:]
        return (picked * mask).sum(-1)

    def step():
        if spec["way"] == "fused":
            policy_chosen, policy_rejected = adapter.preference_logprobs(chosen, rejected)
        else:
            policy_chosen, policy_rejected = unfused_logps(chosen), unfused_logps(rejected)
        loss, _ = dpo_loss(policy_chosen, policy_rejected, reference, reference)
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: both ways need them
        return loss.detach()

    step()  # gradient buffers and lazy initialisation first, then the measured call
    return {"peak_bytes": _measure.peak_extra_bytes(step, torch.device("cpu"))}


def _memory_comparison(hidden: int, layers: int) -> dict:
    spec = dict(hidden=hidden, layers=layers)
    return {way: _measure.run_worker(["-m", "fastalign.demo"], dict(spec, way=way),
                                     for_memory=True)
            for way in ("fused", "unfused")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="fastalign demo", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--output", default="fastalign-demo",
                        help="output directory: model, metrics.jsonl, metrics.png (a rerun "
                             "replaces the run there)")
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="use only the first N training pairs (and N/3 held-out): quicker")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the fused-vs-unfused peak memory comparison")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_memory_worker(json.loads(args.worker))))
        return

    from fastalign.trainer import DPOConfig, DPOTrainer

    started = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer, train, held_out = _model_and_data(args.hidden, args.layers, args.max_pairs)
    parameters = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    print(f"fastalign demo: DPO on a tiny Llama ({args.layers} layers, hidden {args.hidden}, "
          f"vocabulary {vocab}, {parameters / 1e6:.1f}M parameters) on the CPU; fused backend: "
          f"{fastalign.select_backend(torch.device('cpu'))}")
    print(f"data: {len(train)} training pairs, {len(held_out)} held-out pairs on unseen topics "
          f"({BUNDLED_PREFERENCES['demo']})")
    config = DPOConfig(output_dir=args.output, learning_rate=args.learning_rate,
                       max_steps=args.steps, batch_size=args.batch_size,
                       warmup_steps=max(1, args.steps // 10), eval_steps=max(1, args.steps // 2),
                       reference="precomputed", progress=not args.no_progress, beta=0.1,
                       overwrite=True)  # a rerun of the demo replaces the last one
    trainer = DPOTrainer(model, tokenizer, config, train, held_out)
    before = trainer.evaluate()
    print(f"before training: held-out preference accuracy "
          f"{before['eval_preference_accuracy']:.2f}, DPO loss {before['eval_loss']:.3f}")
    after = trainer.train()
    after = {k: v for k, v in after.items() if k.startswith("eval_")} or trainer.evaluate()
    train_seconds = time.perf_counter() - started

    print(f"\nafter {args.steps} steps ({train_seconds:.0f} s from the start):")
    print(f"  held-out preference accuracy  {before['eval_preference_accuracy']:.2f} -> "
          f"{after['eval_preference_accuracy']:.2f}   (mean per-token log-prob of chosen > "
          "rejected)")
    print(f"  held-out reward accuracy      {before['eval_rewards/accuracies']:.2f} -> "
          f"{after['eval_rewards/accuracies']:.2f}   (DPO implicit reward, chosen > rejected; "
          "0 before: policy = reference)")
    print(f"  held-out DPO loss             {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}")
    print(f"  model, metrics.jsonl and metrics.png in {trainer.output_dir}/")
    if not args.no_memory:
        print(f"\npeak memory of one DPO forward + backward, {MEMORY_PAIRS} pairs "
              "(fresh process each):")
        results = _memory_comparison(args.hidden, args.layers)
        for way, label in (("fused", "fastalign (linear_logprobs, no logits)"),
                           ("unfused", "unfused (logits + float32 log_softmax)")):
            result = results[way]
            text = (f"{result['peak_bytes'] / 2**20:8.0f} MB" if "peak_bytes" in result
                    else f"failed: {result['error']}")
            print(f"  {label:40} {text}")
        if all("peak_bytes" in r for r in results.values()):
            ratio = results["unfused"]["peak_bytes"] / max(results["fused"]["peak_bytes"], 1)
            print(f"  the unfused path needs {ratio:.1f}x the memory")
    print(f"\ndone in {time.perf_counter() - started:.0f} s")
    if not args.no_memory:
        _measure.exit_on_failures(results, "the memory measurement")


if __name__ == "__main__":
    main()
