"""The sharded lm_head layouts ``linear_logprobs`` and ``linear_divergence`` (``linear_kl``)
accept, resolved to plain tensors before their checks run.

* FSDP2 (``fully_shard``) leaves the head's weight and bias as ``DTensor`` parameters. With a
  plain ``hidden`` (data parallel: each rank its own rows) the weight is gathered once per call
  with ``full_tensor(grad_placements=[Partial("avg")] * mesh.ndim)``: the backward then
  reduce-scatters the ranks' gradients to the weight's shards as their average, the convention
  FSDP2 and DDP follow for every other parameter. ``full_tensor()``'s default (``Replicate``)
  would claim every rank computed the same gradient and keep only this rank's.
* A ``DTensor`` ``hidden`` replicated on a 1-D mesh with the weight ``Shard(0)`` on that mesh is
  a vocabulary-parallel head: ``linear_logprobs`` runs its ``process_group`` path on the local
  shards (``mesh.get_group()``); ``linear_divergence`` takes no DTensor that way (plain
  vocabulary shards with a ``process_group`` are its vocabulary-parallel form) and gathers the
  weight, each rank keeping its shard of the full gradient every rank computes alike
  (``Replicate``).
* DeepSpeed ZeRO-3 parameters (``ds_id``) hold an empty ``.data`` outside their module's
  forward. The op runs inside ``deepspeed.zero.GatheredParameters`` in an autograd Function
  whose backward gathers again and recomputes the forward there: the fused backward reads the
  weight again, and keeping the forward's gathered copy alive until then would hold the whole
  head on every rank (and DeepSpeed may reuse that buffer).

Anything else raises, naming the argument, its layout and what to do. Plain tensors pay only
``is_plain``'s type checks; torch.distributed.tensor and deepspeed are imported only when a
DTensor or a ``ds_id`` parameter may be present.
"""

from __future__ import annotations

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def is_plain(*tensors) -> bool:
    """True when no argument is a DTensor (or another tensor subclass) or a ZeRO-3 parameter:
    the whole cost of this module for plain tensors."""
    for tensor in tensors:
        if tensor is not None and (type(tensor) not in _PLAIN or hasattr(tensor, "ds_id")):
            return False
    return True


def _dtensor_api():
    """``torch.distributed.tensor`` or None (torch built without distributed)."""
    if not torch.distributed.is_available():
        return None
    try:
        import torch.distributed.tensor as api
    except ImportError:
        return None
    return api


def _is_dtensor(tensor) -> bool:
    api = _dtensor_api()
    return api is not None and isinstance(tensor, api.DTensor)


def _layout(tensor) -> str:
    return f"placements {tuple(tensor.placements)} on a {tensor.device_mesh.ndim}-D mesh"


def _refuse_partial(name: str, tensor) -> None:
    if any(p.is_partial() for p in tensor.placements):
        raise ValueError(
            f"{name} is a DTensor with {_layout(tensor)}: a Partial placement holds unreduced "
            f"sums, not the {name} itself; redistribute it to Shard or Replicate placements "
            f"first ({name}.redistribute(placements=...))")


def gather_data_parallel(name: str, tensor):
    """A DTensor weight or bias gathered whole, its gradient the average over ranks of each
    rank's (plain tensors pass through). For a head whose ranks each bring their own rows."""
    if not _is_dtensor(tensor):
        return tensor
    _refuse_partial(name, tensor)
    from torch.distributed.tensor import Partial
    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)


def _gather_constant(name: str, tensor):
    """A reference model's DTensor gathered whole, without gradient."""
    if not _is_dtensor(tensor):
        return tensor
    _refuse_partial(name, tensor)
    with torch.no_grad():
        return tensor.full_tensor()


def _check_bias(bias_name: str, bias, weight_name: str, weight) -> None:
    """A bias sharded exactly like its weight, or both plain."""
    if bias is None:
        return
    if _is_dtensor(bias) != _is_dtensor(weight):
        kinds = ("a DTensor", "a plain tensor")
        bias_kind, weight_kind = kinds if _is_dtensor(bias) else kinds[::-1]
        raise TypeError(f"{bias_name} is {bias_kind} but {weight_name} is {weight_kind}: pass "
                        f"the head's weight and bias both sharded (as fully_shard leaves them) "
                        f"or both plain")
    if _is_dtensor(bias) and (bias.device_mesh != weight.device_mesh
                              or bias.placements != weight.placements):
        raise ValueError(
            f"{bias_name} is a DTensor with {_layout(bias)} but {weight_name} has "
            f"{_layout(weight)}: shard the head's bias like its weight (fully_shard on the "
            f"head module does)")


def _replicated_local(name: str, tensor, mesh, hidden_name: str):
    """The local tensor of a DTensor replicated on ``mesh`` (plain tensors pass through)."""
    if not _is_dtensor(tensor):
        return tensor
    if tensor.device_mesh != mesh or not all(p.is_replicate() for p in tensor.placements):
        raise ValueError(
            f"{name} is a DTensor with {_layout(tensor)}; with a DTensor {hidden_name} it must "
            f"be replicated on {hidden_name}'s mesh (or a plain tensor)")
    return tensor.to_local()


def _check_vocab_parallel(hidden_name: str, hidden, weight_name: str, weight) -> None:
    """``hidden`` replicated, ``weight`` ``Shard(0)``, on one 1-D mesh."""
    if not _is_dtensor(weight):
        raise TypeError(
            f"{hidden_name} is a DTensor but {weight_name} is a plain tensor: pass the head as a "
            f"DTensor too (Shard(0) on {hidden_name}'s mesh, a vocabulary-parallel head), or "
            f"{hidden_name}.to_local() / .full_tensor() with the plain {weight_name}")
    if not all(p.is_replicate() for p in hidden.placements):
        raise ValueError(
            f"{hidden_name} is a DTensor with {_layout(hidden)}: fastalign takes a DTensor "
            f"{hidden_name} only replicated (every rank the same rows, with a vocabulary-parallel "
            f"head); pass each rank's own rows as a plain tensor (data parallel) or "
            f"{hidden_name}.full_tensor()")
    if hidden.device_mesh != weight.device_mesh:
        raise ValueError(
            f"{hidden_name} and {weight_name} are DTensors on different device meshes "
            f"({hidden.device_mesh} and {weight.device_mesh}): put both on one 1-D mesh")
    from torch.distributed.tensor import Shard
    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(
            f"{weight_name} is a DTensor with {_layout(weight)}; with a replicated DTensor "
            f"{hidden_name} it must be Shard(0) on a 1-D mesh (a vocabulary-parallel head), or "
            f"pass {hidden_name} as a plain tensor (data parallel) to have {weight_name} "
            f"gathered")


def _refuse_group(process_group, *names_and_tensors) -> None:
    if process_group is None:
        return
    name = next(n for n, t in names_and_tensors if _is_dtensor(t))
    raise ValueError(
        f"process_group was given with a DTensor {name}: a DTensor's device mesh already says "
        f"how the head is sharded; pass process_group=None, or plain local shards (to_local()) "
        f"with process_group")


def _resolve_policy(hidden, weight, bias, extras, process_group, *, names, vocab_parallel):
    """``(hidden, weight, bias, extras, process_group)`` of one model's head as plain tensors;
    ``extras`` are per-row (targets, mask): replicated DTensors beside a DTensor hidden."""
    hidden_name, weight_name, bias_name = names
    named = [(hidden_name, hidden), (weight_name, weight), (bias_name, bias),
             *extras.items()]
    if not any(_is_dtensor(t) for _, t in named):
        return hidden, weight, bias, extras, process_group
    _refuse_group(process_group, *named)
    _check_bias(bias_name, bias, weight_name, weight)
    if _is_dtensor(hidden):
        _check_vocab_parallel(hidden_name, hidden, weight_name, weight)
        mesh = hidden.device_mesh
        extras = {k: _replicated_local(k, v, mesh, hidden_name) for k, v in extras.items()}
        if vocab_parallel:
            return (hidden.to_local(), weight.to_local(),
                    None if bias is None else bias.to_local(), extras, mesh.get_group())
        from torch.distributed.tensor import Replicate
        full = lambda t: None if t is None else t.full_tensor(grad_placements=[Replicate()])  # noqa: E731
        return hidden.to_local(), full(weight), full(bias), extras, None
    for name, tensor in extras.items():
        if _is_dtensor(tensor):
            raise TypeError(f"{name} is a DTensor but {hidden_name} is a plain tensor: pass "
                            f"{name} plain too (each rank's own rows, data parallel)")
    return (hidden, gather_data_parallel(weight_name, weight),
            gather_data_parallel(bias_name, bias), extras, None)


# ------------------------------------------------------------------------- DeepSpeed ZeRO-3

def _is_zero3(tensor) -> bool:
    return tensor is not None and hasattr(tensor, "ds_id")


def _deepspeed_zero(names):
    try:
        import deepspeed
    except ImportError as error:
        raise TypeError(f"{names}: DeepSpeed ZeRO-3 partitioned (a ds_id attribute), but "
                        f"deepspeed cannot be imported ({error}) to gather it; install "
                        f"deepspeed or pass plain tensors") from error
    return deepspeed.zero


def _flatten(result):
    """The op's result as a flat tuple of tensors and how to rebuild it."""
    items = list(result) if isinstance(result, tuple) else [result]
    stats = items.pop() if isinstance(items[-1], dict) else None
    keys = () if stats is None else tuple(stats)
    return (*items, *(stats[k] for k in keys)), (isinstance(result, tuple), len(items), keys)


def _unflatten(flat, spec):
    is_tuple, n_items, keys = spec
    items = list(flat[:n_items])
    if keys:
        items.append(dict(zip(keys, flat[n_items:])))
    return tuple(items) if is_tuple else items[0]


class _GatheredHead(torch.autograd.Function):
    """``run(*inputs)`` with ZeRO-3 ``params`` among ``inputs``: applied inside the forward's
    ``GatheredParameters`` (so autograd records the parameters' full shapes); the backward
    gathers them again and differentiates a re-run of ``run``."""

    @staticmethod
    def forward(ctx, run, zero, params, spec, *inputs):
        ctx.run, ctx.zero, ctx.params = run, zero, params
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        flat, spec[0] = _flatten(run(*(None if x is None else x.detach() for x in inputs)))
        ctx.mark_non_differentiable(*flat[spec[0][1]:])  # the row statistics
        return flat

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad[4:]
        gather = ctx.zero.GatheredParameters(ctx.params, modifier_rank=None)
        gather.__enter__()
        try:
            with torch.enable_grad():
                leaves = [None if x is None else x.detach().requires_grad_(need)
                          for x, need in zip(ctx.saved_tensors, needs)]
                flat, _ = _flatten(ctx.run(*leaves))
            pairs = [(out, g) for out, g in zip(flat, grads)
                     if g is not None and out.requires_grad]
            wanted = [x for x in leaves if x is not None and x.requires_grad]
            found = iter(torch.autograd.grad([o for o, _ in pairs], wanted,
                                             [g for _, g in pairs], allow_unused=True)
                         if pairs and wanted else [None] * len(wanted))
            result = [next(found) if x is not None and x.requires_grad else None for x in leaves]
        except BaseException:
            gather.__exit__(None, None, None)
            raise
        accumulating = [p for p, g in zip(ctx.saved_tensors, result)
                        if g is not None and any(p is q for q in ctx.params)]
        _release_after_accumulation(gather, accumulating)
        return (None, None, None, None, *result)


def _release_after_accumulation(gather, params) -> None:
    """Leave ``gather`` once every parameter in ``params`` has its gradient accumulated.

    Autograd accumulates a returned gradient into ``p.grad`` after this backward returns and
    copies it to ``p``'s own shape and strides (the gradient layout contract), so ``p`` must
    still hold its full data then; ZeRO-3's own layers rely on the same (their gradient
    accumulation runs before the module's post-backward hook releases the weight). The end of
    the backward pass releases it too, should a gradient never arrive."""
    state = {"open": True, "pending": {id(p) for p in params}, "handles": []}

    def release():
        if state["open"]:
            state["open"] = False
            for handle in state["handles"]:
                handle.remove()
            gather.__exit__(None, None, None)

    def accumulated(param):
        state["pending"].discard(id(param))
        if not state["pending"]:
            release()

    if not params:
        release()
        return
    state["handles"] = [p.register_post_accumulate_grad_hook(accumulated) for p in params]
    torch.autograd.Variable._execution_engine.queue_callback(release)


def _run_gathered(run, named_params, *inputs):
    """``run(*inputs)`` with the ZeRO-3 parameters among them gathered in forward and backward;
    the result as ``run`` returns it."""
    names = ", ".join(name for name, _ in named_params)
    zero = _deepspeed_zero(names)
    params = [p for _, p in named_params]
    spec = [None]
    with zero.GatheredParameters(params, modifier_rank=None):
        flat = _GatheredHead.apply(run, zero, params, spec, *inputs)
    return _unflatten(flat, spec[0])


def _zero3_named(**tensors):
    return [(name, t) for name, t in tensors.items() if _is_zero3(t)]


# ------------------------------------------------------------------------------ entry points

def linear_logprobs(op, hidden, weight, targets, *, bias, process_group, **options):
    """``op`` (``linear_logprobs`` on plain tensors) on a sharded head, resolved."""
    hidden, weight, bias, extras, process_group = _resolve_policy(
        hidden, weight, bias, {"targets": targets}, process_group,
        names=("hidden", "weight", "bias"), vocab_parallel=True)
    targets = extras["targets"]
    zero3 = _zero3_named(weight=weight, bias=bias)
    if not zero3:
        return op(hidden, weight, targets, bias=bias, process_group=process_group, **options)

    def run(h, w, b):
        return op(h, w, targets, bias=b, process_group=process_group, **options)
    return _run_gathered(run, zero3, hidden, weight, bias)


def linear_pair(op, hidden, weight, teacher_hidden, teacher_weight, bias, teacher_bias, mask, *,
                teacher_names, process_group=None, **options):
    """``op`` (``linear_divergence`` on plain tensors, called as ``op(hidden, weight,
    teacher_hidden, teacher_weight, bias, teacher_bias, mask, process_group=...,
    teacher_names=..., **options)``) on sharded heads, resolved; the teacher's head (its
    arguments named ``teacher_names``: hidden, weight, bias) is gathered without gradient."""
    teacher_hidden_name, teacher_weight_name, teacher_bias_name = teacher_names
    hidden, weight, bias, extras, process_group = _resolve_policy(
        hidden, weight, bias, {"mask": mask, teacher_hidden_name: teacher_hidden}, process_group,
        names=("hidden", "weight", "bias"), vocab_parallel=False)
    mask, teacher_hidden = extras["mask"], extras[teacher_hidden_name]
    _check_bias(teacher_bias_name, teacher_bias, teacher_weight_name, teacher_weight)
    teacher_weight = _gather_constant(teacher_weight_name, teacher_weight)
    teacher_bias = _gather_constant(teacher_bias_name, teacher_bias)
    zero3 = _zero3_named(weight=weight, bias=bias, **{teacher_weight_name: teacher_weight,
                                                      teacher_bias_name: teacher_bias})

    def run(h, w, b, th, tw, tb):
        return op(h, w, th, tw, b, tb, mask, process_group=process_group,
                  teacher_names=teacher_names, **options)
    if not zero3:
        return run(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias)
    return _run_gathered(run, zero3, hidden, weight, bias, teacher_hidden, teacher_weight,
                         teacher_bias)
