"""fastalign in a plain PyTorch loop: DPO on the built-in tiny Llama (128256-token vocabulary).

Completion log-probs come from the hidden states through ``fastalign.linear_logprobs``, so the
``[batch, tokens, 128256]`` logits are never built, forward or backward; ``dpo_loss`` is the DPO
sigmoid loss. Runs offline on the CPU in about a minute (bundled preference pairs, no download):

    python examples/quickstart.py              # 20 steps of 8 pairs
    python examples/quickstart.py --steps 2
"""

import argparse
import copy

import torch
from torch.nn.utils.rnn import pad_sequence

import fastalign as fa
from fastalign.losses import dpo_loss
from fastalign.trainer import byte_tokenizer, tiny_llama
from fastalign.trainer import demo_preferences

IGNORE = -100  # targets outside the completion: no log-prob, no gradient


def batch(tokenizer, rows, side):
    """Token ids of prompt + completion ``side`` and their next-token targets, IGNORE outside
    the completion (the prompt and the padding)."""
    ids, targets = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row[side])["input_ids"] + [tokenizer.eos_token_id]
        ids.append(torch.tensor(prompt + completion))
        targets.append(torch.tensor([IGNORE] * (len(prompt) - 1) + completion))
    return (pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id),
            pad_sequence(targets, batch_first=True, padding_value=IGNORE))


def sequence_logps(model, input_ids, targets):
    """Summed log-probs of each row's completion: ``[B]``."""
    hidden = model.model(input_ids).last_hidden_state[:, :-1]        # [B, T-1, D]
    head = model.lm_head
    return fa.linear_logprobs(hidden, head.weight, targets, bias=head.bias).sum(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    policy = tiny_llama()                                            # 2 layers, random weights
    reference = copy.deepcopy(policy).requires_grad_(False)          # frozen DPO reference
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    pairs = demo_preferences("train")
    print(f"DPO on a tiny Llama, vocabulary {policy.config.vocab_size}, "
          f"backend {fa.select_backend(torch.device('cpu'))}")
    for step in range(args.steps):
        rows = [pairs[(step * args.batch_size + i) % len(pairs)] for i in range(args.batch_size)]
        chosen, rejected = batch(tokenizer, rows, "chosen"), batch(tokenizer, rows, "rejected")
        with torch.no_grad():
            ref_chosen = sequence_logps(reference, *chosen)
            ref_rejected = sequence_logps(reference, *rejected)
        loss, metrics = dpo_loss(sequence_logps(policy, *chosen),
                                 sequence_logps(policy, *rejected),
                                 ref_chosen, ref_rejected, beta=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1:3}: loss {loss.item():.4f}, "
              f"reward accuracy {metrics['rewards/accuracies']:.2f}")


if __name__ == "__main__":
    main()
