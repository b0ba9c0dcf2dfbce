"""Which module implements an op for a backend: the Triton kernels' launchers in
``fastalign.kernels.<name>``, the native C++ kernels' in ``fastalign.ops.<name>_native`` or the
pure-torch twin in ``fastalign.ops.<name>_torch``. All expose the same functions, so an op treats
them alike."""

from __future__ import annotations

import importlib

import torch

from .. import _native


def backend_module(op: str, backend: str, kernels_name: str, torch_name: str):
    """``torch_name`` ends in ``_torch``; the native twin has the same stem and ends in ``_native``."""
    if backend == "triton":
        return importlib.import_module(f"fastalign.kernels.{kernels_name}")
    if backend == "torch":
        return importlib.import_module(f"fastalign.ops.{torch_name}")
    if backend == "native":
        return importlib.import_module(f"fastalign.ops.{torch_name.removesuffix('_torch')}_native")
    raise RuntimeError(f"{op} has no {backend} backend")


def new_gradient(like: torch.Tensor, backend: str) -> torch.Tensor:
    """The tensor a backward op returns its ``[..., V]`` gradient in: contiguous, ``like``'s
    shape and dtype; the native backend's comes from its reusable huge-page buffers."""
    if backend == "native":
        return _native.new_gradient(like)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)
