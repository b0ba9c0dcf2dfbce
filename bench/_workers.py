"""What the bench scripts' fresh worker processes build and run, where more than one script
needs it: the providers of the log-prob ops from logits (bench_token_logprobs.py,
bench_native_cpu.py) and from hidden states and a head (bench_linear_logprobs.py,
bench_native_cpu.py), and the DPO, GRPO and distillation training steps (bench_dpo_step.py,
bench_grpo_step.py, bench_trl_step.py). The scripts' docstrings say what each provider is.

Kept out of the scripts so that no script imports another. Under ``--baseline`` this file,
like harness.py, is this tree's: only the fastalign it imports is the staged revision's.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import random
import string
import sys
import types
import warnings
from pathlib import Path

import torch

import fastalign
from fastalign import _measure
from fastalign.reference import token_logprobs_reference

MODES = ("fwd", "fwd_bwd")


# Log-probs from logits [B, T, V] (bench_token_logprobs.py).
TOKEN_PROVIDERS = ("torch_eager", "torch_compile", "trl", "fastalign")


def eager_token_logprobs(logits, targets):
    return token_logprobs_reference(logits, targets, compute_dtype=torch.float32)


def _trl_token_logprobs(device: torch.device):
    try:
        from trl.trainer.utils import selective_log_softmax
        return selective_log_softmax
    except Exception:  # ImportError, or whatever a missing optional dependency raises
        if device.type != "cuda":
            raise
        # The GPU image lacks TRL's heavier dependencies (datasets); on CUDA this is exactly
        # the kernel selective_log_softmax dispatches to.
        from trl.kernels import selective_log_softmax_and_entropy
        return lambda logits, targets: selective_log_softmax_and_entropy(logits, targets)[0]


def token_op(provider: str, device: torch.device):
    if provider == "torch_eager":
        return eager_token_logprobs
    if provider == "torch_compile":
        for limit in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, 64)
        return torch.compile(eager_token_logprobs, dynamic=False)
    if provider == "trl":
        return _trl_token_logprobs(device)
    if provider == "fastalign":
        return fastalign.token_logprobs
    raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(TOKEN_PROVIDERS)}")


def token_call(spec: dict, device: torch.device):
    """The inputs of one configuration and a closure running it once."""
    logits, targets = _measure.random_logits(spec["batch"], spec["seq"], spec["vocab"],
                                             spec["dtype"], device)
    op = token_op(spec["provider"], device)
    if spec["mode"] == "fwd":
        def call():
            with torch.no_grad():
                return op(logits, targets)
    else:
        logits.requires_grad_()

        def call():
            return torch.autograd.grad(op(logits, targets).sum(), logits)
    return call


# The fused-linear ops: log-probs and KL from hidden states and heads (bench_linear_logprobs.py).
LINEAR_PROVIDERS = {"logprobs": ("torch_eager", "trl", "liger", "cce", "fastalign",
                                 "fastalign_cublas", "fastalign_min_p", "fastalign_top_k",
                                 "matmul_floor"),
                    "kl": ("torch_eager", "trl", "liger", "fastalign")}
CUDA_ONLY = ("liger", "cce")  # Triton kernels without a CPU path
TRL_CHUNK_SIZE = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
SAMPLER_MIN_P, SAMPLER_TOP_K = 0.05, 50  # the sampler-aware providers' settings


def eager_linear_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def eager_linear_kl(hidden, weight, ref_hidden, ref_weight):
    log_p = torch.log_softmax((hidden @ weight.T).float(), -1)
    log_q = torch.log_softmax((ref_hidden @ ref_weight.T).float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _trl_kernel(module_name: str, attribute: str):
    """A class of ``trl.kernels.<module_name>``, loaded even where trl's own imports fail."""
    try:  # maybe_gather_lm_head_ctx comes from here; import it before measuring
        import trl.trainer.utils  # noqa: F401
    except Exception:
        # The GPU image lacks trl.trainer's dependencies (datasets). maybe_gather_lm_head_ctx only
        # all-gathers a ZeRO-3 sharded lm_head and is a no-op otherwise: stand in a nullcontext.
        shim = types.ModuleType("trl.trainer.utils")
        shim.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = shim
    try:
        module = importlib.import_module(f"trl.kernels.{module_name}")
    except Exception:  # trl/__init__ or trl.kernels pulling a dependency this image lacks
        path = Path(importlib.util.find_spec("trl").origin).parent / "kernels" / f"{module_name}.py"
        spec = importlib.util.spec_from_file_location(f"trl.kernels.{module_name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return getattr(module, attribute)


def linear_op(op: str, provider: str, device: torch.device):
    """``logprobs``: ``f(hidden, weight, targets) -> [N]``; ``kl``: ``f(hidden, weight,
    ref_hidden, ref_weight) -> [N]`` (Liger: the token mean). Peers are imported when asked."""
    if provider in CUDA_ONLY and device.type != "cuda":
        raise RuntimeError(f"{provider} needs CUDA (Triton kernels only)")
    if provider not in LINEAR_PROVIDERS[op]:
        raise ValueError(f"{provider} has no {op}; choose from {', '.join(LINEAR_PROVIDERS[op])}")
    # The Triton backend's matmul path, read at each call (forward and backward): a CUDA
    # benchmark runs its providers one after another in one process, each wholly after its
    # build, so the provider built last sets it for its own measurement.
    # (fastalign.ops._backends.CUDA_MATMUL_ENV, named here: a --baseline revision may lack it.)
    os.environ["FASTALIGN_CUDA_MATMUL"] = "cublas" if provider == "fastalign_cublas" else "tiles"
    if op == "kl":
        if provider == "torch_eager":
            return eager_linear_kl
        if provider == "trl":  # beta = 1: KL(student || teacher), returns (divergence, entropy)
            function = _trl_kernel("chunked_divergence", "ChunkedDivergenceFunction")
            return lambda h, w, rh, rw: function.apply(h, w, None, rh, rw, None, 1.0)[0]
        if provider == "liger":  # jsd_beta = 1: KL(student || teacher), a scalar token mean
            from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction
            return lambda h, w, rh, rw: LigerFusedLinearJSDFunction.apply(h, w, rh, rw, None, 1.0)
        return fastalign.linear_kl
    if provider == "torch_eager":
        return eager_linear_logprobs
    if provider == "trl":
        function = _trl_kernel("chunked_logprob", "ChunkedLogProbFunction")
        return lambda h, w, t: function.apply(h, w, None, t, 1.0, TRL_CHUNK_SIZE, None, 1.0, ())[0]
    if provider == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        # (input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        #  label_smoothing, reduction): per-token loss in float32
        return lambda h, w, t: -LigerFusedLinearCrossEntropyFunction.apply(
            h, w, t, None, None, -100, 0.0, 0.0, "none")[0]
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy
        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none").float()
    if provider == "fastalign_min_p":  # renormalized over a min-p sampler's support
        return lambda h, w, t: fastalign.linear_logprobs(h, w, t, min_p=SAMPLER_MIN_P)
    if provider == "fastalign_top_k":  # renormalized over a top-k sampler's support
        return lambda h, w, t: fastalign.linear_logprobs(h, w, t, top_k=SAMPLER_TOP_K)
    return fastalign.linear_logprobs


def linear_call(spec: dict, device: torch.device):
    """The inputs of one configuration and a closure running it once."""
    hidden, weight, targets, ref_hidden, ref_weight = _measure.random_head(
        spec["tokens"], spec["hidden"], spec["vocab"], spec["dtype"], device)
    if spec["provider"] == "matmul_floor":
        return matmul_floor_call(hidden, weight, spec["mode"])
    op = linear_op(spec["op"], spec["provider"], device)
    args = (hidden, weight, targets) if spec["op"] == "logprobs" else (hidden, weight, ref_hidden,
                                                                        ref_weight)
    if spec["mode"] == "fwd":
        def call():
            with torch.no_grad():
                return op(*args)
    else:
        hidden.requires_grad_()
        weight.requires_grad_()

        def call():
            return torch.autograd.grad(op(*args).sum(), (hidden, weight))
    return call


def matmul_floor_call(hidden, weight, mode: str):
    """The GEMMs any exact log-prob op of this shape runs, alone, into outputs allocated here:
    fwd the logits (1 GEMM); fwd_bwd also their recomputation, dHidden and dWeight (4: an op
    whose backward does not know its gradient in the forward; a loss that does needs 3)."""
    logits = hidden.new_empty(hidden.shape[0], weight.shape[0])
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.empty_like(weight)

    def call():
        torch.mm(hidden, weight.T, out=logits)
        if mode != "fwd":
            torch.mm(hidden, weight.T, out=logits)
            torch.mm(logits, weight, out=grad_hidden)
            torch.mm(logits.T, hidden, out=grad_weight)
    return call


# One DPO or GRPO training step of fastalign's trainer or TRL's (bench_dpo_step.py,
# bench_grpo_step.py, bench_trl_step.py): ``step()`` runs one optimizer update.
def trainer_model(spec: dict):
    """``(model, tokenizer)`` of the trainer-step benchmarks: ``spec["model"]`` by name
    (``smollm2``: ``make real``), or the tiny Llama of ``spec``'s shape with the byte
    tokenizer (``"tiny"``, the default)."""
    from fastalign.trainer import byte_tokenizer, load_model_and_tokenizer, tiny_llama

    device = spec.get("device", "cpu")
    if spec.get("model", "tiny") != "tiny":
        model, tokenizer = load_model_and_tokenizer(spec["model"])
        return model.to(device), tokenizer
    return tiny_llama(vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                      num_layers=spec["layers"], max_positions=2048,
                      seed=spec.get("seed", 0)).to(device), byte_tokenizer()


def trainer_tokenizer(spec: dict):
    """The tokenizer of ``spec``'s model, to make the data with: the tiny Llama's byte
    tokenizer is the same at any size, so a toy-sized model stands in for the measured one."""
    return trainer_model(dict(spec, vocab=300, hidden=8, layers=1))[1]


def random_text(rng, tokens: int, tokenizer) -> str:
    """Lowercase words cut to ``tokens`` tokens of ``tokenizer``."""
    words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(5))
                     for _ in range(tokens))
    return tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][:tokens])


def preference_rows(pairs: int, prompt_tokens: int, completion_tokens: int, tokenizer,
                    mix: bool = False) -> list[dict]:
    """Random words of the given token counts (``mix``: each between a quarter of them and
    all; the EOS the trainers append is the completion's last token)."""
    rng = random.Random(0)

    def text(n):
        return random_text(rng, rng.randint(max(1, n // 4), n) if mix else n, tokenizer)

    return [dict(prompt=text(prompt_tokens), chosen=text(completion_tokens - 1),
                 rejected=text(completion_tokens - 1)) for _ in range(pairs)]


def dpo_fastalign_step(spec, rows, out):
    from fastalign.trainer import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=out, batch_size=spec["pairs"], learning_rate=1e-6,
                       max_steps=100, max_grad_norm=None, progress=False, reference="copy",
                       max_length=2048, padding_free=spec["provider"] == "fastalign_packed",
                       gradient_checkpointing=spec["provider"] == "fastalign_checkpointed")
    model, tokenizer = trainer_model(spec)
    trainer = DPOTrainer(model, tokenizer, config, rows)
    return trainer.training_step


def dpo_trl_step(spec, rows, out):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DPOConfig(output_dir=out, per_device_train_batch_size=spec["pairs"],
                         learning_rate=1e-6, report_to=[],
                         use_cpu=spec.get("device", "cpu") == "cpu", bf16=False,
                         max_length=2048, max_grad_norm=0.0)
        model, tokenizer = trainer_model(spec)
        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             processing_class=tokenizer, train_dataset=Dataset.from_list(rows))
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])

    def step():
        trainer.model.train()
        loss = trainer.training_step(trainer.model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def random_prompts(count: int, tokens: int, tokenizer) -> list[str]:
    """Random lowercase words of ``tokens`` tokens each."""
    rng = random.Random(0)
    return [random_text(rng, tokens, tokenizer) for _ in range(count)]


def length_reward(prompts, completions, **_):
    """Any reward that differs within a group will do (the advantages are then non-zero)."""
    return [float(len(set(text))) for text in completions]


def grpo_fastalign_step(spec, prompts, out):
    from fastalign.trainer import GRPOConfig, GRPOTrainer

    config = GRPOConfig(output_dir=out, batch_size=spec["prompts"],
                        num_generations=spec["generations"], max_new_tokens=spec["completion"],
                        learning_rate=1e-6, max_steps=100, max_grad_norm=None, beta=0.0,
                        progress=False)
    trainer = GRPOTrainer(*trainer_model(spec), config, prompts, [length_reward])

    def step():
        return trainer.training_step()["completion_length"]

    return step


def grpo_trl_step(spec, prompts, out):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = spec["prompts"] * spec["generations"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=rows,
                          num_generations=spec["generations"], steps_per_generation=1,
                          max_completion_length=spec["completion"], learning_rate=1e-6,
                          beta=0.0, temperature=1.0, top_p=1.0, report_to=[],
                          use_cpu=spec["device"] == "cpu",
                          bf16=False, max_grad_norm=0.0, logging_steps=10**6)
        model, tokenizer = trainer_model(spec)
        trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=args,
                              processing_class=tokenizer,
                              train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
    batches = iter(trainer.get_train_dataloader())

    def step():
        trainer.model.train()
        inputs = next(batches)
        trainer.training_step(trainer.model, inputs, None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        mask = trainer._buffered_inputs[0]["completion_mask"]
        return float(mask.sum(-1).float().mean())

    return step


def distill_trl_step(spec, prompts, out):
    """One step of TRL's DistillationTrainer: the student (``spec``'s tiny Llama) samples a
    completion of each prompt (TRL 1.16's trainer is on-policy only; the untrained model never
    samples EOS, so every completion has ``spec["completion"]`` tokens), then the divergence
    to a wider teacher of the same vocabulary (``teacher_hidden``, another seed), backward,
    AdamW. ``step()`` returns the seconds its sampling took, which is the same work patched or
    not (the patch replaces only the loss); ``step.sampling`` lists every step's."""
    import time

    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = DistillationConfig(output_dir=out, per_device_train_batch_size=spec["rows"],
                                  max_completion_length=spec["completion"], beta=spec["beta"],
                                  learning_rate=1e-6, report_to=[],
                                  use_cpu=spec.get("device", "cpu") == "cpu", bf16=False,
                                  max_grad_norm=0.0, logging_steps=10**6)
        model, tokenizer = trainer_model(spec)
        teacher, _ = trainer_model(dict(spec, hidden=spec["teacher_hidden"], seed=1))
        trainer = DistillationTrainer(model=model, teacher_model=teacher, args=args,
                                      processing_class=tokenizer,
                                      train_dataset=Dataset.from_list([{"prompt": p}
                                                                       for p in prompts]))
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop otherwise
    batches = iter(trainer.get_train_dataloader())
    sampling = []
    generate = trainer._generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        result = generate(*args, **kwargs)
        sampling.append(time.perf_counter() - start)
        return result

    trainer._generate = timed_generate

    def step():
        trainer.model.train()
        trainer.training_step(trainer.model, next(batches), None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return sampling[-1]

    step.sampling = sampling
    return step
