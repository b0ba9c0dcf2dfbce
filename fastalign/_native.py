"""The native C++ CPU kernels (``csrc/``): built just in time, cached, optional.

Why just in time rather than in ``setup.py``: an extension built at install time is tied to the
torch it was built against (a later torch upgrade breaks the import), and building it inside
pip's isolated environment would download a multi-GB CUDA torch. Compiling on first use with
``torch.utils.cpp_extension.load`` (ninja) builds against the torch that is actually imported,
into a cache keyed by the torch and Python versions and the CPU's vector extension, so it is
paid once per machine (about a minute on 2 cores; ``make`` pre-builds it during the install, or
run ``python -m fastalign._build_native``).

Loading takes no lock. Beside the built ``.so`` a stamp holds a sha256 over everything the
build depends on (the ``csrc`` sources, flags, extension name, torch and Python versions); when
it matches, the ``.so`` is imported directly, without ``cpp_extension.load`` (which would take
its own ``lock`` file in the build folder on every first call, and wait forever on one left by
a killed process). Only a build takes a lock: an ``fcntl.flock`` on ``<build folder>/.build.flock``,
which the kernel drops when its holder dies, so a killed build cannot leave it stale. The build
runs in a private ``.build-<pid>`` folder (torch's ``lock`` only ever lives there), then the
``.so`` and, last, its stamp are moved into place atomically. A process that waits longer than
``FASTALIGN_NATIVE_LOCK_TIMEOUT`` seconds (default 600) for another's build warns and uses the
torch backend. Without ``fcntl`` (not POSIX) builds take no lock: each uses its own private
folder, the last one's ``.so`` stays, and leftovers of killed builds are not cleaned up.

Without a compiler (or with any other build failure) fastalign keeps working through the torch
backend and says so once in a warning. ``FASTALIGN_NATIVE=0`` turns the extension off without a
warning; ``FASTALIGN_NATIVE_BUILD_DIR`` moves the cache.

The native backward kernels write their ``[..., V]`` gradients into buffers from
``csrc/buffers.cpp``: huge pages, and the latest freed gradient's memory reused by the next
(``FASTALIGN_NATIVE_GRAD_CACHE=0`` turns reuse off; ``fastalign.empty_cache()`` frees it).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

try:
    import fcntl  # POSIX: the build lock
except ImportError:  # Windows: builds run unlocked (see the module docstring)
    fcntl = None

ENABLE_ENV = "FASTALIGN_NATIVE"
BUILD_DIR_ENV = "FASTALIGN_NATIVE_BUILD_DIR"
GRAD_CACHE_ENV = "FASTALIGN_NATIVE_GRAD_CACHE"
LOCK_TIMEOUT_ENV = "FASTALIGN_NATIVE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 600.0
LOCK_FILE = ".build.flock"
SOURCES = ("bindings.cpp", "logprobs.cpp", "divergence.cpp", "jsd_grad.cpp", "buffers.cpp")
LDFLAGS = ["-fopenmp"]
LIB_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # what cpp_extension.load writes

_build_error: str | None = None


def disabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip() == "0"


def _source_dir() -> Path:
    # fastalign/csrc/ holds sources only (no __init__.py): a namespace subpackage, one path.
    from . import csrc
    return Path(next(iter(csrc.__path__)))


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


def _extension_name(capability: str) -> str:
    return f"fastalign_native_{capability}"


def _fingerprint(capability: str) -> str:
    """sha256 over everything the built extension depends on: every csrc source and header,
    the compiler and linker flags, the extension name, the torch and Python versions."""
    digest = hashlib.sha256()

    def part(data: bytes) -> None:  # length-prefixed, so no two inputs hash alike
        digest.update(len(data).to_bytes(8, "little") + data)

    source_dir = _source_dir()
    for path in sorted([*source_dir.glob("*.cpp"), *source_dir.glob("*.h")]):
        part(path.name.encode())
        part(path.read_bytes())
    for text in (_extension_name(capability), *_flags(capability), *LDFLAGS, torch.__version__,
                 sys.version):
        part(text.encode())
    return digest.hexdigest()


def _import_built(directory: Path, capability: str, fingerprint: str):
    """The extension imported from ``directory``'s built library if its stamp matches
    ``fingerprint``, else None. Takes no lock: the stamp is written only once the library is
    complete and in place."""
    name = _extension_name(capability)
    library = directory / f"{name}{LIB_SUFFIX}"
    try:
        if (directory / f"{name}.stamp").read_text().strip() != fingerprint or not library.is_file():
            return None
    except OSError:  # no stamp yet: never built here, or by a fastalign without stamps
        return None
    # As cpp_extension.load imports it: a pybind11 module whose init is named after ``name``.
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:  # a damaged library behind a matching stamp: rebuild it
        return None
    return module


class _LockTimeout(Exception):
    def __init__(self, path: Path, waited: float):
        super().__init__(f"another process holds the build lock {path} (waited {waited:.0f} s)")
        self.path, self.waited = path, waited


def _lock_timeout() -> float:
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    try:
        return float(raw) if raw else DEFAULT_LOCK_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Holds an exclusive ``flock`` on ``directory/.build.flock`` (raises _LockTimeout after
    ``FASTALIGN_NATIVE_LOCK_TIMEOUT`` seconds). flock, not a lock file: the kernel releases it
    when the holder exits or is killed, so no build can leave a stale lock behind."""
    if fcntl is None:
        yield
        return
    path, timeout = directory / LOCK_FILE, _lock_timeout()
    with open(path, "a") as handle:  # "a": create it if missing, never truncate; it stays empty
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # polled rather than blocking, so that a timeout is possible
                waited = time.monotonic() - start
                if waited >= timeout:
                    raise _LockTimeout(path, waited) from None
                if not told:
                    print(f"fastalign: waiting for another process's build of the native CPU "
                          f"kernels (lock {path}, up to {timeout:.0f} s; {LOCK_TIMEOUT_ENV} sets "
                          "the limit)...", file=sys.stderr, flush=True)
                    told = True
                time.sleep(min(0.25, max(timeout - waited, 0.01)))
        yield  # closing the file releases the lock


def _build(directory: Path, capability: str, fingerprint: str):
    """Builds the extension (the caller holds the build lock) and imports it."""
    from torch.utils import cpp_extension

    _put_pip_ninja_on_path()
    if fcntl is not None:  # leftovers of killed builds; safe to delete: every builder holds the lock
        for leftover in directory.glob(".build-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    # A private folder: torch's own ``lock`` file (which a killed build leaves behind and every
    # later cpp_extension.load in that folder waits on forever) lives where nobody else looks.
    private = directory / f".build-{os.getpid()}"
    shutil.rmtree(private, ignore_errors=True)
    private.mkdir()
    try:
        print(f"fastalign: building the native CPU kernels into {directory} "
              "(once per machine, about a minute)...", file=sys.stderr, flush=True)
        module = cpp_extension.load(
            name=_extension_name(capability), sources=[str(_source_dir() / s) for s in SOURCES],
            extra_cflags=_flags(capability), extra_ldflags=LDFLAGS, build_directory=str(private),
            verbose=False)
        # os.replace, never a copy over the old file: it is atomic, and a process that has the
        # old library mapped keeps its (now unlinked) file. The stamp goes last: it says done.
        library = directory / f"{_extension_name(capability)}{LIB_SUFFIX}"
        os.replace(module.__file__, library)
        module.__file__ = str(library)
        (private / "stamp").write_text(fingerprint + "\n")
        os.replace(private / "stamp", directory / f"{_extension_name(capability)}.stamp")
        return module
    finally:
        shutil.rmtree(private, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _load():
    """The extension module, or None with the reason in ``_build_error`` (tried once)."""
    global _build_error
    capability = _capability()
    directory = build_dir(capability)
    try:
        fingerprint = _fingerprint(capability)
        module = _import_built(directory, capability, fingerprint)  # built: no lock, no torch builder
        if module is not None:
            return module
        directory.mkdir(parents=True, exist_ok=True)
        with _build_lock(directory):
            # Another process may have finished the build while this one waited.
            module = _import_built(directory, capability, fingerprint)
            return module if module is not None else _build(directory, capability, fingerprint)
    except _LockTimeout as timeout:  # never hang: fall back, and say how to wait longer
        _build_error = f"TimeoutError: {timeout}"
        warnings.warn(
            f"fastalign: waited {timeout.waited:.0f} s for the native build lock {timeout.path}, "
            "which another process holds (probably building the native CPU extension); CPU ops "
            f"use the slower torch backend in this process. Set {LOCK_TIMEOUT_ENV}=<seconds> to "
            "wait longer.", RuntimeWarning, stacklevel=3)
        return None
    except Exception as error:  # a missing compiler, ninja, headers: fall back, never crash
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        _build_error = f"{type(error).__name__}: {lines[-1] if lines else error}"
        warnings.warn(
            f"fastalign: the native CPU extension could not be built ({_build_error}); CPU ops "
            "use the slower torch backend. Install a C++ compiler (g++) and ninja, or set "
            f"{ENABLE_ENV}=0 to silence this. Build folder: {directory}",
            RuntimeWarning, stacklevel=3)
        return None


def _build_failure() -> str | None:
    return None if _load() is not None else f"the native extension could not be built ({_build_error})"


# Under torch.compile the build status is a constant of the trace (the build itself must never
# be traced: it calls torch.backends and the compiler). The mark is what
# torch._dynamo.assume_constant_result sets, and all it sets (tests/test_compile.py checks that
# it still is), written here without importing torch._dynamo: that import is ~3 s of the start
# of every process that never compiles (the CLI's workers, the demos' measurements).
_build_failure._dynamo_marked_constant = True


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
