"""Backend selection: which implementation runs an op for a given device.

Automatic choice (DESIGN.md): Triton on CUDA, the native C++ extension on CPU when it is built,
the pure-torch chunked path otherwise. ``FASTALIGN_BACKEND=triton|native|torch`` forces one and
fails with a clear error when it cannot run on the tensors' device. ``TRITON_INTERPRET=1`` makes
the Triton backend available for CPU tensors (that is how CI runs every kernel on a CPU); it never
makes Triton the automatic choice on CPU, where the interpreter is far slower than torch.

The environment is read on every call, so a test or a script may change it between calls.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

from . import _native

BACKENDS = ("triton", "native", "torch")
BACKEND_ENV = "FASTALIGN_BACKEND"


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    # find_spec walks sys.path (~100 us): once per process, not once per op call.
    return importlib.util.find_spec("triton") is not None


def _triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not (for the error)."""
    if not _triton_installed():
        return "the 'triton' package is not installed (pip install 'fastalign[triton]')"
    if device.type == "cuda":
        return None
    if device.type != "cpu":
        return f"Triton kernels run on CUDA tensors, not on {device.type} tensors"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 (slow, for tests)"
    # triton.jit reads TRITON_INTERPRET when a kernel is defined, i.e. when a fastalign.kernels
    # module is first imported. Kernels compiled for the GPU cannot be interpreted afterwards.
    kernels = sys.modules.get("fastalign.kernels._interpreter")
    if kernels is not None and not kernels.INTERPRETED:
        return ("fastalign.kernels was imported before TRITON_INTERPRET=1 was set; "
                "set it before the first call")
    return None


def _native_unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the native extension runs on CPU tensors, not on {device.type} tensors"
    # The first call builds (or loads) the extension; later calls return at once.
    return _native.unavailable_reason()


def _torch_unavailable_reason(device: torch.device) -> str | None:
    return None


_REASONS = {
    "triton": _triton_unavailable_reason,
    "native": _native_unavailable_reason,
    "torch": _torch_unavailable_reason,
}


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on ``device`` right now, in order of preference."""
    device = torch.device(device)
    return [name for name in BACKENDS if _REASONS[name](device) is None]


def select_backend(device: torch.device | str) -> str:
    """The backend an op should use for tensors on ``device``.

    Raises:
        ValueError: ``FASTALIGN_BACKEND`` names no known backend.
        RuntimeError: the forced backend cannot run on ``device``; the message says why.
    """
    device = torch.device(device)
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in _REASONS:
            raise ValueError(
                f"{BACKEND_ENV}={forced!r} is not a backend; use one of {', '.join(BACKENDS)} "
                "or unset it for the automatic choice")
        reason = _REASONS[forced](device)
        if reason is not None:
            raise RuntimeError(f"{BACKEND_ENV}={forced} cannot run on {device.type} tensors: {reason}")
        return forced
    if device.type == "cuda" and _triton_unavailable_reason(device) is None:
        return "triton"
    if device.type == "cpu" and _native_unavailable_reason(device) is None:
        return "native"
    return "torch"
