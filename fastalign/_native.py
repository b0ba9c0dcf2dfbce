"""The native C++ CPU kernels (``csrc/``): built just in time, cached, optional.

Why just in time rather than in ``setup.py``: an extension built at install time is tied to the
torch it was built against (a later torch upgrade breaks the import), and building it inside
pip's isolated environment would download a multi-GB CUDA torch. Compiling on first use with
``torch.utils.cpp_extension.load`` (ninja) builds against the torch that is actually imported,
into a cache keyed by the torch and Python versions and the CPU's vector extension, so it is
paid once per machine (about a minute on 2 cores; ``make`` pre-builds it during the install, or
run ``python -m fastalign._build_native``).

Without a compiler (or with any other build failure) fastalign keeps working through the torch
backend and says so once in a warning. ``FASTALIGN_NATIVE=0`` turns the extension off without a
warning; ``FASTALIGN_NATIVE_BUILD_DIR`` moves the cache.

The native backward kernels write their ``[..., V]`` gradients into buffers from
``csrc/buffers.cpp``: huge pages, and the latest freed gradient's memory reused by the next
(``FASTALIGN_NATIVE_GRAD_CACHE=0`` turns reuse off; ``fastalign.empty_cache()`` frees it).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

ENABLE_ENV = "FASTALIGN_NATIVE"
BUILD_DIR_ENV = "FASTALIGN_NATIVE_BUILD_DIR"
GRAD_CACHE_ENV = "FASTALIGN_NATIVE_GRAD_CACHE"
SOURCES = ("bindings.cpp", "logprobs.cpp", "kl.cpp", "buffers.cpp")

_build_error: str | None = None


def disabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip() == "0"


def _source_dir() -> Path:
    # Installed as the package fastalign.csrc (setup.py maps the repository's csrc/ folder).
    from . import csrc
    return Path(csrc.__file__).parent


def _capability() -> str:
    """The vector ISA to build for: AVX2 (with FMA, F16C) where this CPU and torch support it,
    else ATen's portable scalar fallback."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
            return "avx2"
    return "default"


def _flags(capability: str) -> list[str]:
    # -fopenmp: at::parallel_for is a header template; without it the pragma inside compiles
    # to a serial loop. The extension then shares the libgomp torch has already loaded.
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    if capability == "avx2":
        # ATen's Vectorized<float> picks its AVX2 implementation from these macros; its exp and
        # tanh then run 8 lanes wide (the Sleef symbols come from libtorch_cpu).
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return flags


def build_dir(capability: str) -> Path:
    root = os.environ.get(BUILD_DIR_ENV) or Path.home() / ".cache" / "fastalign" / "native"
    version = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}"
    return Path(root) / f"{version}-{capability}"


def _put_pip_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package ``ninja`` (a dependency of
    fastalign) puts it in the venv's bin folder, which need not be on PATH."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path


@functools.lru_cache(maxsize=None)
def _load():
    """The extension module, or None with the reason in ``_build_error`` (tried once)."""
    global _build_error
    capability = _capability()
    directory = build_dir(capability)
    try:
        from torch.utils import cpp_extension

        _put_pip_ninja_on_path()
        directory.mkdir(parents=True, exist_ok=True)
        sources = [str(_source_dir() / name) for name in SOURCES]
        fresh = not any(directory.glob("*.so"))
        if fresh:
            print(f"fastalign: building the native CPU kernels into {directory} "
                  "(once per machine, about a minute)...", file=sys.stderr, flush=True)
        return cpp_extension.load(
            name=f"fastalign_native_{capability}", sources=sources,
            extra_cflags=_flags(capability), extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
    except Exception as error:  # a missing compiler, ninja, headers: fall back, never crash
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        _build_error = f"{type(error).__name__}: {lines[-1] if lines else error}"
        warnings.warn(
            f"fastalign: the native CPU extension could not be built ({_build_error}); CPU ops "
            "use the slower torch backend. Install a C++ compiler (g++) and ninja, or set "
            f"{ENABLE_ENV}=0 to silence this. Build folder: {directory}",
            RuntimeWarning, stacklevel=3)
        return None


# Under torch.compile the build status is a constant of the trace (the build itself must never
# be traced: it calls torch.backends and the compiler).
@torch._dynamo.assume_constant_result
def _build_failure() -> str | None:
    return None if _load() is not None else f"the native extension could not be built ({_build_error})"


def unavailable_reason() -> str | None:
    """None when the native kernels can run, else why not (for errors and messages)."""
    if disabled():
        return f"the native extension is turned off ({ENABLE_ENV}=0)"
    return _build_failure()


def extension():
    """The built extension module; raises RuntimeError with the reason when it is unavailable."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return _load()


def new_gradient(like: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor of ``like``'s shape and dtype for a native backward kernel to fill:
    from the extension's gradient buffers (huge pages; the latest freed gradient's memory
    reused unless ``FASTALIGN_NATIVE_GRAD_CACHE=0``), see ``csrc/buffers.cpp``."""
    reuse = os.environ.get(GRAD_CACHE_ENV, "1").strip() != "0"
    return extension().empty_gradient(list(like.shape), like.dtype, reuse)


def empty_cache() -> int:
    """Frees the gradient buffer the native CPU backend keeps for reuse (as
    ``torch.cuda.empty_cache`` does for CUDA's caching allocator) and returns its size in bytes;
    0 when none is kept or the extension was never loaded (it is not built for this)."""
    if disabled() or _load.cache_info().currsize == 0:
        return 0
    module = _load()
    return 0 if module is None else int(module.release_gradient_buffers())
