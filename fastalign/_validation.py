"""Checks at the public boundary: every message names the argument and says what to do.

Checks that need the values of a CUDA tensor (target ids in range) would force a host sync; they
run on CPU tensors always and on CUDA tensors only when ``FASTALIGN_CHECK_TARGETS=1``. Without it,
the CUDA kernels never read out of bounds and report such rows as NaN instead.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHECK_TARGETS_ENV = "FASTALIGN_CHECK_TARGETS"
# Options that scale float32 values (temperature, softcap, beta): the option and its reciprocal
# must both be normal float32 numbers. Past these bounds 1 / x or x itself becomes inf (or a
# denormal that loses bits, or 0 where a GPU flushes denormals) inside the kernels, and
# 0 * inf = NaN follows; within them the kernels match float64 semantics.
SCALE_RANGE = (torch.finfo(torch.float32).tiny, 1.0 / torch.finfo(torch.float32).tiny)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_float_tensor(name: str, x, last: str = "[..., V] with a non-empty vocabulary "
                                                  "dimension V") -> None:
    """A float tensor whose last dimension is not empty (``last`` says what it is)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be {_dtype_names(FLOAT_DTYPES)}, got {x.dtype}; "
            f"cast it first, e.g. {name}.float()")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape {last}, got shape {tuple(x.shape)}")


def choose_targets(targets, topk_targets) -> tuple[torch.Tensor, bool]:
    """``(ids, topk)``: the token ids a log-prob op reads, and whether they are ``topk_targets``
    (``[..., K]``, K ids per row) rather than ``targets`` (``[...]``, one id per row). Exactly
    one of the two must be given: the keyword, not the tensor's shape, says which it is."""
    if (targets is None) == (topk_targets is None):
        got = "neither" if targets is None else "both"
        raise TypeError("pass exactly one of targets ([...]: one token id per row) and "
                        f"topk_targets ([..., K]: K token ids per row), got {got}")
    return (targets, False) if topk_targets is None else (topk_targets, True)


def values_checkable(tensor: torch.Tensor) -> bool:
    """Whether a check may read ``tensor``'s values: on the CPU, and on CUDA only with
    ``FASTALIGN_CHECK_TARGETS=1`` (reading them there is a GPU sync); never while torch.compile
    traces (the values are not known then)."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or os.environ.get(CHECK_TARGETS_ENV) == "1"


def check_targets(targets, leading_shape, vocab_size: int, device: torch.device, ignore_index,
                  source: str = "logits", topk: bool = False) -> None:
    """Type, shape and device of ``targets`` against ``source`` (a ``[..., V]`` tensor or
    ``[..., D]`` hidden states); ids in range on CPU (and on CUDA when asked, see above).
    ``topk``: they are ``topk_targets``, ``[..., K]`` with ``K >= 1`` ids per row."""
    name = "topk_targets" if topk else "targets"
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got {targets.dtype}; "
                        f"use {name}.long()")
    check_ignore_index(ignore_index)
    shape, leading_shape = tuple(targets.shape), tuple(leading_shape)
    if topk and (shape[:-1] != leading_shape or len(shape) != len(leading_shape) + 1
                 or shape[-1] == 0):
        raise ValueError(
            f"topk_targets has shape {shape} but must be [..., K] with [...] = "
            f"{source}.shape[:-1] = {leading_shape} and K >= 1 (K token ids per row of "
            f"{source}); one id per row goes in targets")
    if not topk and shape != leading_shape:
        hint = ("; K ids per row go in topk_targets" if shape[:-1] == leading_shape else "")
        raise ValueError(
            f"targets has shape {shape} but must equal {source}.shape[:-1] = "
            f"{leading_shape} (one target id per row of {source}){hint}")
    if targets.device != device:
        raise ValueError(f"{source} is on {device} but {name} is on {targets.device}; "
                         "move both to the same device")
    if values_checkable(targets):  # elsewhere the kernels stay in bounds
        check_target_range(targets, vocab_size, ignore_index, name)


def check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int,
                       name: str = "targets") -> None:
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(out_of_range.any()):
        positions = out_of_range.nonzero()
        first = tuple(positions[0].tolist())
        raise ValueError(
            f"{name} holds {positions.shape[0]} id(s) outside [0, V={vocab_size}) that are not "
            f"ignore_index={ignore_index}; the first is {int(targets[first])} at position {first}. "
            "Mark positions without a target with ignore_index.")


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    """`` in [low, high)``, `` > low`` and so on (leading space), or "" when unbounded."""
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:.3g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:.3g}"
    return f" in {'(' if low_open else '['}{low:.3g}, {high:.3g}{')' if high_open else ']'}"


def check_number(name: str, value, *, low=None, high=None, low_open: bool = False,
                 high_open: bool = False, allow_none: bool = False, why: str = "") -> None:
    """``value`` must be a finite real number (not a bool, not a tensor) in the interval
    ``low .. high`` (closed unless ``*_open``; None = unbounded). The message names the
    argument, the interval and ``why``."""
    if value is None and allow_none:
        return
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and math.isfinite(value)
          and (low is None or (value > low if low_open else value >= low))
          and (high is None or (value < high if high_open else value <= high)))
    if not ok:
        none = "None or " if allow_none else ""
        interval = _interval(low, high, low_open, high_open)
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must be {none}a finite number{interval}{reason}, "
                         f"got {value!r}")


def check_scale(name: str, value, allow_none: bool = False) -> None:
    """An option that scales float32 values: a finite number in ``SCALE_RANGE``."""
    check_number(name, value, low=SCALE_RANGE[0], high=SCALE_RANGE[1], allow_none=allow_none,
                 why="it and its reciprocal scale float32 values")


def check_temperature(value) -> None:
    check_scale("temperature", value)


def check_softcap(value) -> None:
    check_scale("softcap", value, allow_none=True)


def check_int(name: str, value, *, low: int, allow_none: bool = False, why: str = "") -> None:
    """``value`` must be an int (not a bool) >= ``low``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        none = "None or " if allow_none else ""
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must be {none}an int >= {low}{reason}, got {value!r}")


def check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value <= 0:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive finite number{none}, got {value!r}")


def check_ignore_index(value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {value!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_inplace_target(name: str, x: torch.Tensor) -> None:
    """``inplace_backward=True`` writes the gradient over ``x``: refuse memory the caller owns,
    a leaf tensor or a view of one (slicing a parameter or a data tensor gives such a view;
    the gradient would silently overwrite that leaf's values)."""
    if not x.requires_grad:
        return  # no backward will run
    if x.is_leaf:
        raise ValueError(f"inplace_backward=True would overwrite a leaf tensor ({name}) with its "
                         f"own gradient; use it on {name} produced by a layer, or leave it False")
    if x._base is not None and x._base.is_leaf:
        raise ValueError(f"inplace_backward=True would write the gradient into the memory of a "
                         f"leaf tensor: {name} is a view of one (shape "
                         f"{tuple(x._base.shape)}); pass {name} produced by a layer (or a copy, "
                         "e.g. .clone()), or leave it False")


def has_internal_overlap(x: torch.Tensor) -> bool:
    """True unless the elements of ``x`` provably occupy distinct memory: sorted by stride,
    every dim of size > 1 must step past everything the smaller dims span. Conservative (an
    exotic interleaved layout may be reported as overlapping), never the other way: stride-0
    dims (``expand``) and rows closer than their length (``as_strided``) are caught."""
    extent = 1  # elements spanned by the dims seen so far
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz > 1):
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def check_same_device(name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if x.device != other.device:
        raise ValueError(f"{name} is on {x.device} but {other_name} is on {other.device}; "
                         "move both to the same device")


def check_lm_head(hidden, weight, bias, weight_name: str = "weight", hidden_name: str = "hidden",
                  bias_name: str = "bias") -> None:
    """``hidden [..., D]``, ``weight [V, D]`` (an lm_head), ``bias [V]`` or None, on one device.
    Their float dtypes may differ: the matmuls run in ``hidden``'s (under autocast: bf16
    activations against fp32 master weights), each weight slice cast as it is used."""
    check_float_tensor(hidden_name, hidden, "[..., D] with a non-empty hidden dimension D")
    check_float_tensor(weight_name, weight, "[V, D] with a non-empty hidden dimension D")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{weight_name} must have shape [V, D] with D = {hidden_name}.shape[-1] = "
            f"{hidden.shape[-1]} (an lm_head weight, as nn.Linear stores it), got "
            f"{tuple(weight.shape)}")
    check_same_device(weight_name, weight, hidden_name, hidden)
    if bias is None:
        return
    check_float_tensor(bias_name, bias, "[V]")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{bias_name} must have shape [V] = ({weight.shape[0]},), "
                         f"got {tuple(bias.shape)}")
    check_same_device(bias_name, bias, weight_name, weight)


def check_mask(mask, leading_shape, device: torch.device, source: str) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor (True = compute this position), got {got}; "
                        "use mask.bool()")
    if tuple(mask.shape) != tuple(leading_shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)} but must equal {source}.shape[:-1] "
                         f"= {tuple(leading_shape)}")
    if mask.device != device:
        raise ValueError(f"{source} is on {device} but mask is on {mask.device}; "
                         "move both to the same device")


def check_process_group(group) -> None:
    """None, or an initialized ``torch.distributed`` process group."""
    if group is None:
        return
    import torch.distributed as dist
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError("process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"dist.group.WORLD or dist.new_group(ranks)) or None, got {type(group).__name__}")


def check_choice(name: str, value, choices) -> None:
    """``value`` must be one of ``choices``; the message lists them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of: {', '.join(map(repr, choices))}")


def check_same_shape(names_and_tensors, what: str) -> None:
    """Every tensor a float tensor of one shape (``what`` says what they hold)."""
    (first_name, first), *rest = names_and_tensors
    for name, tensor in names_and_tensors:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name} must be a floating-point tensor of {what}, got {got}")
    for name, tensor in rest:
        if tensor.shape != first.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {first_name} has "
                             f"{tuple(first.shape)}; they must match ({what})")


def check_sampler(top_k, min_p, top_p) -> None:
    """The sampler options of the log-prob ops (Hugging Face's warpers' ranges): ``top_k`` None
    or an int >= 1, ``min_p`` None or a number in (0, 1], ``top_p`` None or 1.0 (no filtering;
    anything else is refused, saying why)."""
    check_int("top_k", top_k, low=1, allow_none=True,
              why="keep each row's top_k most likely tokens, ties with the k-th kept")
    check_number("min_p", min_p, low=0.0, high=1.0, low_open=True, allow_none=True,
                 why="keep the tokens with p >= min_p * max p")
    no_filter = (top_p is None or (not isinstance(top_p, bool) and isinstance(top_p, numbers.Real)
                                   and top_p == 1.0))
    if not no_filter:
        raise ValueError(
            f"top_p={top_p!r} is not supported: exact top-p (nucleus) filtering needs each row's "
            "probabilities sorted (the cumulative mass up to each token), which is not "
            "expressible in at most two extra passes over the vocabulary; use min_p and/or top_k "
            "instead (top_p=None or 1.0 means no filtering)")


def check_row_temperature(value, leading_shape, device: torch.device, source: str) -> None:
    """``temperature``: a number (``check_temperature``) or a float tensor of one temperature
    per row, shaped ``[...]`` = ``source.shape[:-1]`` or ``[N]`` (the rows flattened), on
    ``source``'s device. Its values (finite, in ``SCALE_RANGE``) are checked where that costs no
    GPU sync: on CPU, and on CUDA when ``FASTALIGN_CHECK_TARGETS=1``."""
    if not isinstance(value, torch.Tensor):
        check_temperature(value)
        return
    leading_shape = tuple(leading_shape)
    n_rows = math.prod(leading_shape)
    if not value.is_floating_point():
        raise TypeError(f"temperature must be a number or a floating-point tensor of one "
                        f"temperature per row, got a {value.dtype} tensor; use temperature.float()")
    if tuple(value.shape) != leading_shape and tuple(value.shape) != (n_rows,):
        raise ValueError(
            f"temperature has shape {tuple(value.shape)} but a tensor of temperatures must have "
            f"one per row: shape {source}.shape[:-1] = {leading_shape} or [N] = ({n_rows},) "
            "(pass a Python float for one temperature)")
    if value.device != device:
        raise ValueError(f"{source} is on {device} but temperature is on {value.device}; "
                         "move both to the same device")
    if values_checkable(value):
        low, high = SCALE_RANGE
        bad = ~((value >= low) & (value <= high))  # NaN fails both comparisons
        if bool(bad.any()):
            first = tuple(bad.nonzero()[0].tolist())
            raise ValueError(
                f"temperature holds {int(bad.sum())} value(s) outside [{low:.3g}, {high:.3g}] "
                f"(each temperature and its reciprocal scale float32 values; temperatures are "
                f"positive); the first is {float(value[first])!r} at position {first}")
