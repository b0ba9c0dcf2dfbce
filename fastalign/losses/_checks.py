"""Checks shared by the losses: names that must be one of a list, shapes that must agree."""

from __future__ import annotations

import torch


def check_choice(name: str, value, choices) -> None:
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


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask`` (0/1 or bool); 0 for an empty mask rather than NaN."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
