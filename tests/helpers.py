"""What several test files share: small models, data, a CLI runner, unfused references. Test
files import from here, never from each other (conftest.py holds the device, backends and
tolerances)."""

import subprocess
import sys

import pytest
import torch
from conftest import DEVICE
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper

import fastalign as fa
from fastalign.reference import token_logprobs_reference
from fastalign.trainer import byte_tokenizer, load_preferences, tiny_llama

DEMO_DATA = "fastalign/data/demo_preferences.jsonl"
RL_PROMPTS = ["Tell me about owls.", "Hi", "Name a fruit.", "Why is the sky blue?"]


def preference_rows(n=4, conversational=False):
    """The first ``n`` bundled training pairs, as text or as chat messages."""
    picked = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
              for r in load_preferences(DEMO_DATA, split="train")[:n]]
    if conversational:
        picked = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in picked]
    return picked


def small_llama(seed=0, scale=1.0):
    """A 1-layer Llama over 1000 tokens (the preference trainers' tests); ``scale`` multiplies
    every weight so the policy and the reference give clearly different, non-uniform
    distributions."""
    model = tiny_llama(vocab_size=1000, hidden_size=32, num_layers=1, seed=seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return model


def small_policy(seed=0):
    """A 2-layer Llama over 300 tokens (the RL trainers' tests: the byte tokenizer's range)."""
    return tiny_llama(vocab_size=300, hidden_size=32, num_layers=2, seed=seed)


def lowercase_share(prompts, completions):
    """The share of a completion's characters that are lowercase letters (0 when empty)."""
    return [sum(c.islower() for c in text) / max(len(text), 1) for text in completions]


def run_cli(*args, timeout=600):
    """``python -m fastalign ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "fastalign", *args], capture_output=True,
                          text=True, timeout=timeout)


def policy_reference(lp, old, adv, mask, clip_low, clip_high, dual_clip, ref, kl_coef, kind,
                     level, aggregation, max_length):
    """Case by case: A >= 0 keeps min(r, 1 + eps_high) A; A < 0 keeps max(r, 1 - eps_low) A."""
    batch, length = lp.shape
    adv = adv if adv.dim() == 2 else adv[:, None].expand(batch, length)
    rows = []
    for b in range(batch):
        count = mask[b].sum()
        if level == "sequence":
            mean_log_ratio = ((lp[b] - old[b]) * mask[b]).sum() / max(count, 1)
        row = []
        for t in range(length):
            log_ratio = mean_log_ratio if level == "sequence" else lp[b, t] - old[b, t]
            ratio, a = torch.exp(log_ratio), adv[b, t]
            if a >= 0:
                loss = -a * torch.clamp(ratio, max=1 + clip_high)
            else:
                loss = -a * torch.clamp(ratio, min=1 - clip_low)
                if dual_clip is not None:
                    loss = torch.clamp(loss, max=-dual_clip * a)
            if ref is not None:
                r = ref[b, t] - lp[b, t]
                kl = {"k1": -r, "k2": r * r / 2, "k3": torch.exp(r) - r - 1}[kind]
                loss = loss + kl_coef * kl
            row.append(loss * mask[b, t])
        rows.append(torch.stack(row))
    per_token = torch.stack(rows)
    sums, counts = per_token.sum(1), mask.sum(1)
    if aggregation == "token_mean":
        return sums.sum() / counts.sum()
    if aggregation == "seq_mean_token_mean":
        return torch.stack([s / max(c, 1) for s, c in zip(sums, counts)]).mean()
    if aggregation == "seq_mean_token_sum":
        return sums.mean()
    return sums.sum() / (batch * (max_length or length))


def run_both(logits, targets, *, entropy_weight=True, **options):
    """fastalign and the float64 reference on the same inputs, with random upstream gradients
    on both outputs. Returns ((lp, ent, grad), (ref_lp, ref_ent, ref_grad))."""
    results = []
    grad_lp = torch.randn(targets.shape, device=DEVICE)
    grad_ent = torch.randn(targets.shape, device=DEVICE) if entropy_weight else None
    for fn in (fa.token_logprobs, token_logprobs_reference):
        leaf = logits.detach().clone().requires_grad_()
        logprobs, entropy = fn(leaf * 1, targets, return_entropy=True, **options)  # non-leaf input
        loss = (logprobs * grad_lp).sum()
        if grad_ent is not None:
            loss = loss + (entropy * grad_ent).sum()
        loss.backward()
        results.append((logprobs, entropy, leaf.grad))
    return results


class _ForbiddenTrlHead:
    """Stands in for TRL's chunked log-prob function in patched runs."""

    @staticmethod
    def apply(*args, **kwargs):
        raise AssertionError("TRL's own chunked log-prob function ran in a patched run")


def forbid_trl_head(monkeypatch):
    """TRL's chunked log-prob function raises from here on: a patched run must not use it."""
    import trl.trainer.utils
    monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", _ForbiddenTrlHead)


def tiny_gemma2(seed):
    """A 1-layer Gemma-2 over 300 tokens with a final-logit soft cap of 3 that matters."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8,
                                       final_logit_softcapping=3.0, tie_word_embeddings=False,
                                       pad_token_id=byte_tokenizer().pad_token_id)
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():  # logits of a few units: the cap of 3 then matters
        model.get_output_embeddings().weight.mul_(50.0)
    return model


class FakeZero3:
    """A stand-in for ``deepspeed`` (installed in ``sys.modules`` by ``fake_deepspeed``) with
    ZeRO-3's contract for a partitioned parameter: ``p.ds_id`` set, ``p.data`` empty except
    inside ``zero.GatheredParameters([p, ...], modifier_rank=None)``, which fills it from a
    stored full copy and empties it again on exit. ``enters`` counts the gathers."""

    def __init__(self):
        import contextlib
        self.enters = 0
        self.full = {}
        fake = self

        @contextlib.contextmanager
        def gathered_parameters(params, modifier_rank=None, enabled=True):
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            params = [p for p in params if hasattr(p, "ds_id")]
            fake.enters += 1
            for p in params:
                p.data = fake.full[p.ds_id]
            try:
                yield
            finally:
                for p in params:
                    p.data = torch.empty(0, dtype=p.dtype)

        self.zero = type("zero", (), {"GatheredParameters": staticmethod(gathered_parameters)})

    def partition(self, parameter: torch.nn.Parameter) -> torch.nn.Parameter:
        """``parameter`` partitioned: its full data stored here, an empty tensor left."""
        parameter.ds_id = len(self.full)
        self.full[parameter.ds_id] = parameter.data.clone()
        parameter.data = torch.empty(0, dtype=parameter.dtype)
        return parameter


def fake_deepspeed(monkeypatch) -> FakeZero3:
    """A FakeZero3 installed as ``deepspeed`` for this test."""
    fake = FakeZero3()
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    return fake


def dpo_trainer(out, *, model=None, **options):
    """A DPOTrainer of ``small_llama`` on 4 bundled pairs into ``out`` (2 pairs a step, 2 steps,
    a checkpoint at step 2 unless ``options`` say otherwise), a seed-1 copy as its reference."""
    from fastalign.trainer import DPOConfig, DPOTrainer

    options = dict(dict(batch_size=2, max_steps=2, save_steps=2, progress=False), **options)
    reference = None if "reference" in options else small_llama(1)
    return DPOTrainer(model or small_llama(), byte_tokenizer(),
                      DPOConfig(output_dir=str(out), **options), preference_rows(4),
                      ref_model=reference)


def slow_beyond(values, fast):
    """``values`` for ``pytest.mark.parametrize``, those not in ``fast`` marked slow: the fast
    tier (``-m "not slow"``) runs one case of each kernel path, ``make test`` all of them."""
    return [value if value in fast else pytest.param(value, marks=pytest.mark.slow)
            for value in values]


def warped_log_softmax(z, *, temperature=1.0, softcap=None, top_k=None, min_p=None):
    """float64 log-softmax of HF's warpers in generate's order (temperature, top-k, min-p) over
    ``[..., V]`` logits; removed tokens -inf. Differentiable."""
    z = z.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.double().reshape(z.shape[:-1])[..., None]
    scores = (z / temperature).reshape(-1, z.shape[-1])
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if min_p is not None:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return torch.log_softmax(scores, dim=-1).reshape(z.shape)


def warped_entropy(log_p):
    """The entropy of the rows of a ``warped_log_softmax`` (its -inf entries hold no mass)."""
    return -(log_p.exp() * torch.where(log_p > float("-inf"), log_p, 0.0)).sum(-1)
