"""Checks at the public boundary: every message names the argument and says what to do.

Checks that need the values of a CUDA tensor (target ids in range) would force a host sync; they
run on CPU tensors always and on CUDA tensors only when ``FASTALIGN_CHECK_TARGETS=1``. Without it,
the CUDA kernels never read out of bounds and report such rows as NaN instead.
"""

from __future__ import annotations

import math
import os
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CHECK_TARGETS_ENV = "FASTALIGN_CHECK_TARGETS"


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be {_dtype_names(FLOAT_DTYPES)}, got {x.dtype}; "
            f"cast it first, e.g. {name}.float()")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(
            f"{name} must have shape [..., V] with a non-empty vocabulary dimension V, "
            f"got shape {tuple(x.shape)}")


def check_targets(targets, logits: torch.Tensor, ignore_index) -> None:
    """Type, shape and device of ``targets`` against ``logits [..., V]``; ids in range on CPU."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of token ids, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor of token ids, got {targets.dtype}; "
                        "use targets.long()")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets has shape {tuple(targets.shape)} but must equal logits.shape[:-1] = "
            f"{tuple(logits.shape[:-1])} (one target id per row of logits)")
    if targets.device != logits.device:
        raise ValueError(f"logits is on {logits.device} but targets is on {targets.device}; "
                         "move both to the same device")
    if targets.device.type == "cpu" or os.environ.get(CHECK_TARGETS_ENV) == "1":
        check_target_range(targets, logits.shape[-1], ignore_index)


def check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    out_of_range = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(out_of_range.any()):
        positions = out_of_range.nonzero()
        first = tuple(positions[0].tolist())
        raise ValueError(
            f"targets holds {positions.shape[0]} id(s) outside [0, V={vocab_size}) that are not "
            f"ignore_index={ignore_index}; the first is {int(targets[first])} at position {first}. "
            "Mark positions without a target with ignore_index.")


def check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value <= 0:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive finite number{none}, got {value!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
