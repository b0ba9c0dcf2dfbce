"""Which module implements an op for a backend: the Triton kernels' launchers in
``fastalign.kernels.<name>`` or the pure-torch twin in ``fastalign.ops.<name>_torch``. Both
expose the same functions, so an op treats them alike."""

from __future__ import annotations

import importlib


def backend_module(op: str, backend: str, kernels_name: str, torch_name: str):
    if backend == "triton":
        return importlib.import_module(f"fastalign.kernels.{kernels_name}")
    if backend == "torch":
        return importlib.import_module(f"fastalign.ops.{torch_name}")
    # select_backend only returns what is available; native lands with csrc/.
    raise RuntimeError(f"{op} has no {backend} backend")
