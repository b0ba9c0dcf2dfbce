"""Rollouts for RL fine-tuning: sample completions of prompts from the policy with ``generate``
and recompute the sampled tokens' log-probs through the fused ops (the "old" log-probs of PPO
and GRPO), under the sampling temperature.

Prompts are left-padded for generation and completions end at their first stop token (EOS by
default; it is kept, what follows is padding). Training passes then see each row as
``[left padding | prompt | completion | right padding]`` with ``position_ids`` that start at the
first real token, so a recomputed log-prob is the one the token was sampled with.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import random
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..._validation import check_sampler
from ..models.adapter import CausalLMAdapter
from ..core.data import _ids


def prompt_text(item):
    """The prompt of a prompt item: the item itself (text or chat messages), or a row's
    ``"prompt"`` (a row's other fields, e.g. a verifier's ``answer``, go to the reward
    functions: ``prompt_columns``)."""
    return item["prompt"] if isinstance(item, dict) else item


def prompt_columns(items: list) -> dict[str, list]:
    """The fields of prompt rows besides ``"prompt"``, one list per field aligned with
    ``items`` (None where an item lacks it), as TRL passes dataset columns to reward functions."""
    names = sorted({key for item in items if isinstance(item, dict) for key in item} - {"prompt"})
    return {name: [item.get(name) if isinstance(item, dict) else None for item in items]
            for name in names}


@dataclass
class Rollouts:
    """``[R, T]`` rows (``R = len(prompts) * num_generations``, a prompt's generations next to
    each other): token ids, attention / completion masks, position ids; ``old_logprobs``
    ``[R, T-1]`` float32, the log-prob of token ``t+1`` at position ``t`` on completion tokens
    (0 elsewhere; None when not asked for); ``prompt_index`` ``[R]``; ``completions``, the decoded texts."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    position_ids: torch.Tensor
    old_logprobs: torch.Tensor | None
    prompt_index: torch.Tensor
    completions: list[str]
    sampler_logprobs: torch.Tensor | None = None  # as old_logprobs, the sampler's own

    def model_inputs(self) -> dict:
        return dict(input_ids=self.input_ids, completion_mask=self.completion_mask,
                    attention_mask=self.attention_mask, position_ids=self.position_ids)

    def rows(self, start: int, end: int) -> Rollouts:
        """Rows ``start:end`` (views, no copies)."""
        return Rollouts(self.input_ids[start:end], self.attention_mask[start:end],
                        self.completion_mask[start:end], self.position_ids[start:end],
                        None if self.old_logprobs is None else self.old_logprobs[start:end],
                        self.prompt_index[start:end], self.completions[start:end],
                        None if self.sampler_logprobs is None
                        else self.sampler_logprobs[start:end])


def _left_padded(rows: list[list[int]], pad_token_id: int):
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, length - len(row):] = torch.tensor(row)
        attention_mask[index, length - len(row):] = 1
    return input_ids, attention_mask


class _Sampling:
    """A ``generate`` logits processor that turns greedy decoding into sampling from
    ``softmax(scores / temperature)`` filtered as Hugging Face's warpers filter it, in
    ``generate``'s order: the ``top_k`` most likely tokens (ties with the k-th kept), the
    ``top_p`` nucleus, then the tokens with ``p >= min_p * max p``. It draws the token itself
    and returns scores that are 0 there and -inf elsewhere.

    The draw inverts the CDF in two levels, blocks of ``BLOCK`` tokens then a token within the
    chosen block, both cumulated in float64 (a cumulative sum over 128k tokens in float32 could
    misplace up to ~1% of the mass), from one uniform number per row: on a [128, 128256] CPU
    batch it costs ~0.1 s where ``torch.multinomial`` costs 0.6 s and the Gumbel-max trick (a
    random number per token) 0.35 s.

    ``generators``: one ``random.Random`` per row, drawn from once per step; a row's tokens
    then depend only on its seed and its own logits, not on which rows share its batch or
    process (rollouts equal on any number of processes). None: ``torch.rand``.
    """

    BLOCK = 1024

    def __init__(self, temperature: float, top_p: float, generators: list | None = None,
                 record: bool = False, top_k: int | None = None, min_p: float | None = None,
                 processed: bool = False):
        self.temperature, self.top_p, self.generators = temperature, top_p, generators
        self.top_k, self.min_p, self.processed = top_k, min_p, processed
        # With record: each step's float32 log-prob of the drawn tokens as the trainer takes
        # them: under softmax(scores / temperature) over the whole vocabulary, or with
        # ``processed`` over the top_k / min_p support, renormalized.
        self.recorded = [] if record else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        log_normalizer = None
        if self.recorded is not None and not self.processed:
            log_normalizer = torch.logsumexp(scores, -1)
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -torch.inf)
        order = None
        if self.top_p < 1:  # drop tokens once the more likely ones already hold top_p
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            probs.masked_fill_((probs.cumsum(-1) - probs) >= self.top_p, 0.0)
            if self.min_p is not None:  # p >= min_p * max p; the max is the first, kept
                probs.masked_fill_(probs < self.min_p * probs[:, :1], 0.0)
        else:
            probs = scores.softmax(-1)  # _draw takes unnormalized probabilities
            if self.min_p is not None:  # as MinPLogitsWarper: p >= min_p * max p
                removed = probs < self.min_p * probs.amax(-1, keepdim=True)
                probs.masked_fill_(removed, 0.0)
                if self.processed and self.recorded is not None:  # the kept normalizer below
                    scores = scores.masked_fill(removed, -torch.inf)
        if log_normalizer is None and self.recorded is not None:
            log_normalizer = torch.logsumexp(scores, -1)  # over the kept support
        uniform = None
        if self.generators is not None:
            uniform = torch.tensor([[g.random()] for g in self.generators], dtype=torch.float64,
                                   device=probs.device)
        index = _draw(probs, self.BLOCK, uniform)
        if order is not None:
            index = order.gather(-1, index)
        if self.recorded is not None:
            self.recorded.append(scores.gather(-1, index)[:, 0] - log_normalizer)
        return scores.fill_(-torch.inf).scatter_(-1, index, 0.0)


def _draw(probs: torch.Tensor, block: int, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """``[R, 1]`` indices drawn from the rows of ``probs`` (``[R, V]``, >= 0, not normalized)
    with the float64 uniform numbers ``uniform [R, 1]`` (default: fresh ones)."""
    rows, vocab = probs.shape
    full = vocab // block * block
    # float32 block sums (a relative error ~1e-7 in each block's mass; float64 costs 3x here).
    sums = [probs[:, :full].view(rows, -1, block).sum(-1)] if full else []
    if full < vocab:
        sums.append(probs[:, full:].sum(-1, keepdim=True))
    block_sums = torch.cat(sums, 1).double()
    block_cdf = block_sums.cumsum(-1)
    if uniform is None:
        uniform = torch.rand(rows, 1, dtype=torch.float64, device=probs.device)
    target = uniform * block_cdf[:, -1:]
    chosen = torch.searchsorted(block_cdf, target, right=True).clamp_(max=block_sums.shape[1] - 1)
    target -= block_cdf.gather(-1, chosen) - block_sums.gather(-1, chosen)  # left in the block
    positions = chosen * block + torch.arange(block, device=probs.device)
    values = probs.gather(-1, positions.clamp(max=vocab - 1)).double()
    values.masked_fill_(positions >= vocab, 0.0)
    within = torch.searchsorted(values.cumsum(-1), target, right=True)
    # Rounding can put the target at the very top of the block: take its last possible token.
    last = (torch.arange(block, device=probs.device) * (values > 0)).amax(-1, keepdim=True)
    return chosen * block + torch.minimum(within, last)


def _stop_mask(completion: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """1 up to and including the first stop token of each row, 0 after it."""
    is_stop = torch.isin(completion, torch.tensor(stop_ids, device=completion.device))
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()  # stops strictly before t
    return (stops_before == 0).long()


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts: list, *, num_generations: int = 1,
                      max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                      top_k: int | None = None, min_p: float | None = None,
                      processed_logprobs: bool = False, stop_tokens: list[str] | None = None,
                      logprobs: bool = True,
                      seeds: list[int] | None = None, synced: bool = False,
                      greedy: bool = False, padding_free: bool = False,
                      on_step: Callable[[], None] | None = None, sampler=None,
                      sampler_logprobs: bool = False) -> Rollouts:
    """Samples ``num_generations`` completions of each prompt (text, or chat messages rendered
    with the generation prompt; or rows with a ``"prompt"``, see ``prompt_text``) and
    recomputes their log-probs with ``linear_logprobs`` (``logprobs=False``: not,
    ``old_logprobs`` is None; sampling only, as Best-of-N). ``greedy``: the most likely token
    at each step instead of a sample (held-out evaluation), ``temperature`` then only scales
    the recomputed log-probs. ``padding_free``: recompute them packed (``packing.py``).

    ``seeds``: one per prompt; its generation ``g`` samples from ``random.Random(f"{seed}/{g}")``,
    so a completion is the same whatever else is generated beside it (default: the global
    torch RNG). ``synced``: keep stepping until every process is done (``generate``'s
    ``synced_gpus``), which FSDP2 needs: each forward pass gathers parameters collectively.
    ``on_step``: called once per generated token position (a progress bar's update).
    ``sampler``: the model that samples (default ``model``; e.g. a bf16 copy of it, as an
    inference engine in lower precision), while ``model`` recomputes the log-probs.
    ``sampler_logprobs``: keep the sampler's own log-prob of each sampled token
    (``Rollouts.sampler_logprobs``, the rollout log-probs of rollout correction).
    ``top_k``, ``top_p``, ``min_p``: Hugging Face's warpers, in ``generate``'s order.
    ``processed_logprobs``: every log-prob kept (recomputed and the sampler's) is of the
    distribution sampled from, renormalized over the ``top_k`` / ``min_p`` support (not with
    ``top_p < 1``: ``linear_logprobs`` refuses it).

    Raises:
        ValueError: no prompts, a non-positive count or length, a temperature <= 0, a top_p
            or min_p outside (0, 1], a top_k < 1, processed_logprobs with top_p < 1, a
            tokenizer without a pad token, or a stop token that is not one
            token of the vocabulary.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    prompts = [prompt_text(item) for item in prompts]
    if num_generations < 1 or max_new_tokens < 1:
        raise ValueError(f"num_generations and max_new_tokens must be >= 1, got "
                         f"{num_generations} and {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    check_sampler(top_k, min_p, None)
    if processed_logprobs and top_p < 1:
        raise ValueError(f"processed_logprobs cannot score a top_p={top_p!r} sampler exactly (the "
                         "nucleus needs each row's probabilities sorted); sample with top_k / "
                         "min_p instead, or leave processed_logprobs off")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set one first, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for token in stop_tokens or []:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"stop token {token!r} is {len(ids)} tokens; stop tokens must be "
                             "single tokens of the vocabulary")
        stop_ids.append(ids[0])
    sampler = model if sampler is None else sampler
    if sampler_logprobs and greedy:
        raise ValueError("sampler_logprobs is for sampled completions, not greedy ones")
    device = next(model.parameters()).device
    prompt_rows = [_ids(tokenizer, prompt, generation_prompt=True) for prompt in prompts]
    prompt_ids, prompt_mask = _left_padded(prompt_rows, tokenizer.pad_token_id)
    prompt_ids = prompt_ids.repeat_interleave(num_generations, 0).to(device)
    prompt_mask = prompt_mask.repeat_interleave(num_generations, 0).to(device)
    was_training, sampler_was_training = model.training, sampler.training
    model.eval()
    sampler.eval()
    # Sampling is greedy decoding of scores _Sampling has drawn from: the same distribution as
    # do_sample=True, without torch.multinomial (0.6 s per call on a [128, 128256] CPU batch).
    generators = None if seeds is None else [
        random.Random(f"{seed}/{g}") for seed in seeds for g in range(num_generations)]
    sampling = None if greedy else _Sampling(temperature, top_p, generators,
                                             record=sampler_logprobs, top_k=top_k,
                                             min_p=min_p, processed=processed_logprobs)
    sequences = sampler.generate(
        input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False, num_beams=1,
        logits_processor=([sampling] if sampling else [])
        + ([_EveryStep(on_step)] if on_step else []),
        max_new_tokens=max_new_tokens, eos_token_id=stop_ids or None,
        pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
    completion = sequences[:, prompt_ids.shape[1]:]
    completion_part = _stop_mask(completion, stop_ids) if stop_ids else torch.ones_like(completion)
    input_ids = torch.cat([prompt_ids, completion.masked_fill(completion_part == 0,
                                                              tokenizer.pad_token_id)], 1)
    attention_mask = torch.cat([prompt_mask, completion_part], 1)
    completion_mask = torch.cat([torch.zeros_like(prompt_mask), completion_part], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    old_logprobs = None
    if logprobs:
        old_logprobs, _ = CausalLMAdapter(model, padding_free=padding_free).completion_logprobs(
            input_ids, completion_mask, attention_mask, position_ids=position_ids,
            temperature=temperature, top_k=top_k if processed_logprobs else None,
            min_p=min_p if processed_logprobs else None)
    recorded = None
    if sampler_logprobs:
        # Completion token j sits at position P + j; its log-prob at P + j - 1 of [R, T - 1].
        steps = torch.stack(sampling.recorded, 1)[:, :completion.shape[1]].to(device)
        recorded = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, device=device)
        start = prompt_ids.shape[1] - 1
        recorded[:, start:start + steps.shape[1]] = steps
        recorded = recorded * completion_mask[:, 1:]
    model.train(was_training)
    sampler.train(sampler_was_training)
    texts = tokenizer.batch_decode(
        [row[mask.bool()] for row, mask in zip(completion, completion_part)],
        skip_special_tokens=True)
    index = torch.arange(len(prompts), device=device).repeat_interleave(num_generations)
    return Rollouts(input_ids, attention_mask, completion_mask, position_ids, old_logprobs,
                    index, texts, recorded)


ROLLOUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_rollout_dtype(trainer) -> None:
    """``rollout_dtype`` copies the whole policy on each process: refused under FSDP2, where a
    process holds a shard of it."""
    processes = trainer.processes
    if trainer.config.rollout_dtype and processes.distributed and processes.parallelism == "fsdp":
        raise ValueError("rollout_dtype samples from a whole copy of the policy, and under FSDP2 "
                         "each process holds a shard of it: use parallelism 'ddp', or leave "
                         "rollout_dtype unset")


def sampler_copy(model, rollout_dtype: str | None):
    """A frozen copy of ``model`` in ``rollout_dtype`` (``bf16``, ``fp16``) to sample from, as
    an inference engine in lower precision would; None for ``None`` (sample from ``model``).
    Made anew for each batch of rollouts, after the latest update."""
    if rollout_dtype is None:
        return None
    return copy.deepcopy(model).to(ROLLOUT_DTYPES[rollout_dtype]).requires_grad_(False)


class _EveryStep:
    """A ``generate`` logits processor that only calls ``callback`` once per decoding step."""

    def __init__(self, callback: Callable[[], None]):
        self.callback = callback

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.callback()
        return scores


def reward_columns(reward_funcs: list, prompts: list, completions: list[str]) -> torch.Tensor:
    """``[len(reward_funcs), len(completions)]``: each ``f(prompts, completions, **fields) ->
    list[float]``, where ``fields`` are the prompt rows' other fields (``prompt_columns``) that
    ``f`` takes by name, or all of them when it takes ``**kwargs``; a wrong count or a
    non-finite value is an error naming the function."""
    fields = prompt_columns(prompts)
    prompts = [prompt_text(item) for item in prompts]
    columns = []
    for function in reward_funcs:
        try:
            returned = function(prompts, completions, **_taken(function, fields))
        except Exception as error:
            raise RewardFunctionError(function, error) from error
        try:
            values = torch.tensor([float(v) for v in returned], dtype=torch.float64)
        except (TypeError, ValueError):
            values = torch.tensor([math.nan])
        if values.shape != (len(completions),) or not torch.isfinite(values).all():
            raise ValueError(f"reward function {reward_name(function)} must return one finite "
                             f"number per completion ({len(completions)}), got "
                             f"{_shown(returned)}")
        columns.append(values.float())
    return torch.stack(columns)


@contextlib.contextmanager
def decoding_progress(trainer, description: str, steps: int):
    """A transient progress bar over ``steps`` decoding steps (``bar.update`` is the
    ``on_step`` of ``generate_rollouts``), shown by the main process when ``trainer.config``
    asks for progress: sampling takes most of an RL step on a CPU, tens of seconds."""
    bar = tqdm(total=steps, desc=description, unit="token", leave=False,
               disable=not (trainer.config.progress and trainer.processes.is_main))
    try:
        yield bar
    finally:
        bar.close()


def held_out_reward_columns(trainer, prompts: list, reward_funcs: list) -> torch.Tensor:
    """``[len(reward_funcs), len(prompts)]``: the ``reward_columns`` of greedy completions of
    ``prompts`` by ``trainer``'s model (``config.max_new_tokens``, ``config.eval_batch_size``
    prompts at a time); on several processes each rank completes its share and all get all."""
    processes, config = trainer.processes, trainer.config
    _ = trainer.root
    start, end = processes.share_bounds(len(prompts))
    size = config.eval_batch_size
    # Every rank generates as many chunks as the largest share needs: under FSDP2 each
    # forward gathers parameters from all ranks, so a rank that stopped early would hang
    # the others. A rank out of prompts completes a stand-in one and drops the result.
    chunks = math.ceil(math.ceil(len(prompts) / processes.world_size) / size)
    columns = []
    # Minutes on a CPU for a hundred prompts: a bar over the decoding steps of every chunk.
    steps = config.max_new_tokens
    with decoding_progress(trainer, f"held-out evaluation, {len(prompts)} prompts",
                           chunks * steps) as bar:
        for index in range(chunks):
            chunk = prompts[start + index * size:min(start + (index + 1) * size, end)]
            rollouts = generate_rollouts(
                trainer.model, trainer.tokenizer, chunk or prompts[:1],
                max_new_tokens=steps, logprobs=False, greedy=True, on_step=bar.update,
                synced=processes.distributed and processes.parallelism == "fsdp")
            bar.update((index + 1) * steps - bar.n)  # the steps a chunk that stopped early skipped
            if chunk:
                columns.append(reward_columns(reward_funcs, chunk, rollouts.completions))
    local = (torch.cat(columns, 1) if columns
             else torch.zeros(len(reward_funcs), 0)).t().contiguous()
    return processes.gather(local.to(trainer.device)).cpu().t()


def score_completions(reward_funcs: list, prompts: list, completions: list[str],
                      weights: list[float] | None = None) -> torch.Tensor:
    """``[len(completions)]`` weighted sum of the ``reward_columns``."""
    weights = torch.tensor(weights or [1.0] * len(reward_funcs))
    return weights @ reward_columns(reward_funcs, prompts, completions)


def _taken(function, fields: dict) -> dict:
    """The ``fields`` that ``function`` accepts as keyword arguments."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: prompts and completions
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return fields
    names = {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {name: values for name, values in fields.items() if name in names}


def reward_name(function) -> str:
    return getattr(function, "__name__", repr(function))


class RewardFunctionError(RuntimeError):
    """A reward function raised: the message names it and shows its own traceback frames."""

    def __init__(self, function, error: BaseException):
        frames = traceback.extract_tb(error.__traceback__)[1:]  # from the function down
        shown = "".join(traceback.format_list(frames)).rstrip()
        super().__init__(f"reward function {reward_name(function)} raised "
                         f"{type(error).__name__}: {error}\n{shown}")


def _shown(values) -> str:
    try:
        return repr(list(values)[:8])
    except TypeError:
        return repr(values)
