"""The native extension's build lock can never hang a process: a built extension loads without
taking any lock (a stale torch ``lock`` file beside it does not matter), a build another process
holds the lock for is waited on only up to FASTALIGN_NATIVE_LOCK_TIMEOUT and then the torch
backend takes over with a warning, and a build killed mid-way leaves nothing that blocks the
next one. Each case runs in a fresh subprocess under a timeout, so a regression fails instead of
hanging the suite. None of them builds the extension: they copy the one built for this machine,
or let the next build fail at once (CXX=false)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import DEVICE

from fastalign import _native

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(DEVICE.type != "cpu", reason="the native kernels run on CPU tensors"),
              pytest.mark.skipif(os.name != "posix", reason="the build lock is an flock (POSIX)")]

# Runs one CPU op and prints the backend it chose, whether the result is right, and the
# RuntimeWarnings about the native extension.
OP_SCRIPT = textwrap.dedent("""
    import warnings
    import torch
    import fastalign as fa
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits, targets = torch.randn(3, 40), torch.tensor([1, 2, 3])
        logprobs = fa.token_logprobs(logits, targets)
        backend = fa.select_backend("cpu")
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
    print(backend, bool(torch.allclose(logprobs, expected, atol=1e-5)))
    for w in caught:
        if "native" in str(w.message):
            print("WARNING", w.message)
""")


def _capability_dir(root):
    """Where fastalign builds for this machine when FASTALIGN_NATIVE_BUILD_DIR=root."""
    return root / _native.build_dir(_native._capability()).name


def _env(root, **extra):
    env = dict(os.environ, FASTALIGN_NATIVE_BUILD_DIR=str(root), TRITON_INTERPRET="0", **extra)
    env.pop("FASTALIGN_BACKEND", None)
    env.pop(_native.ENABLE_ENV, None)
    return env


def _run_op(root, timeout, **extra):
    """Runs OP_SCRIPT; a process that hangs fails the test after ``timeout`` seconds."""
    start = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-c", OP_SCRIPT], env=_env(root, **extra),
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the op hung for {timeout} s (a build lock it waits on forever?); "
                    f"stderr: {hung.stderr}")
    assert result.returncode == 0, result.stderr
    return result, time.monotonic() - start


def _copy_built_extension(root):
    """The extension built for this machine, its library and stamp copied into ``root``."""
    if _native.disabled() or _native._load() is None:
        pytest.skip(f"the native extension is not built here: {_native.unavailable_reason()}")
    source = _native.build_dir(_native._capability())
    target = _capability_dir(root)
    target.mkdir(parents=True)
    name = _native._extension_name(_native._capability())
    for file in (f"{name}{_native.LIB_SUFFIX}", f"{name}.stamp"):
        shutil.copy2(source / file, target / file)
    return target


def test_a_built_extension_loads_past_a_stale_torch_lock(tmp_path):
    """torch's builder waits forever on a ``lock`` file a killed build left in its folder; a
    built extension must load without going near it."""
    directory = _copy_built_extension(tmp_path)
    (directory / "lock").touch()
    result, _ = _run_op(tmp_path, timeout=120)
    assert result.stdout.splitlines()[0] == "native True", result.stdout + result.stderr
    assert "WARNING" not in result.stdout
    assert (directory / "lock").exists()  # not needed, so neither waited on nor removed
    assert "building" not in result.stderr


def test_a_stale_stamp_is_not_loaded(tmp_path):
    """A library whose stamp does not match these sources and flags is rebuilt, not imported
    (the rebuild fails at once here: CXX=false)."""
    directory = _copy_built_extension(tmp_path)
    name = _native._extension_name(_native._capability())
    (directory / f"{name}.stamp").write_text("0" * 64 + "\n")
    result, _ = _run_op(tmp_path, timeout=300, CXX="false")
    assert result.stdout.splitlines()[0] == "torch True", result.stdout + result.stderr
    assert "the native CPU extension could not be built" in result.stdout


def test_the_fingerprint_covers_every_source_and_header(tmp_path, monkeypatch):
    sources = tmp_path / "csrc"
    shutil.copytree(_native._source_dir(), sources, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_native, "_source_dir", lambda: sources)
    capability = _native._capability()
    before = _native._fingerprint(capability)
    assert _native._fingerprint(capability) == before
    with open(sources / "rows.h", "a") as header:
        header.write("\n")
    assert _native._fingerprint(capability) != before
    assert _native._fingerprint("default") != _native._fingerprint("avx2")


def test_a_held_build_lock_times_out_with_a_warning_and_falls_back(tmp_path):
    """Another process holds the build lock (as while it builds, for a minute): wait up to
    FASTALIGN_NATIVE_LOCK_TIMEOUT, then say so and use the torch backend."""
    directory = _capability_dir(tmp_path)
    directory.mkdir(parents=True)
    lock = directory / _native.LOCK_FILE
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         "handle = open(sys.argv[1], 'a')\n"
         "fcntl.flock(handle, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n"
         "time.sleep(300)\n", str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # CXX=false: were the lock ignored, the build would fail at once rather than take a minute.
        result, elapsed = _run_op(tmp_path, timeout=60, CXX="false",
                                  FASTALIGN_NATIVE_LOCK_TIMEOUT="2")
    finally:
        holder.kill()
        holder.wait()
    lines = result.stdout.splitlines()
    assert lines[0] == "torch True", result.stdout + result.stderr
    warning = "\n".join(line for line in lines if line.startswith("WARNING"))
    assert str(lock) in warning and re.search(r"waited [23] s", warning), warning
    assert "another process" in warning and "torch backend" in warning, warning
    assert "FASTALIGN_NATIVE_LOCK_TIMEOUT" in warning, warning
    assert "waiting for another process's build" in result.stderr
    assert elapsed < 60


def test_a_build_killed_midway_does_not_block_the_next(tmp_path):
    """SIGKILL a real build (its whole process group: python, ninja, the compilers) once torch
    has taken its lock; the next process must get straight to its own build (which fails at once
    here, CXX=false) instead of waiting on what the killed one left. A stale torch ``lock`` in
    the build folder itself, as older fastalign versions left, must not matter either."""
    directory = _capability_dir(tmp_path)
    builder = subprocess.Popen([sys.executable, "-c", "from fastalign import _native; _native._load()"],
                               env=_env(tmp_path), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(directory.glob(".build-*/lock")):
            assert builder.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "the build never took torch's lock"
            time.sleep(0.05)
    finally:
        os.killpg(builder.pid, signal.SIGKILL)
        builder.wait()
    leftovers = list(directory.glob(".build-*"))
    assert leftovers and (directory / _native.LOCK_FILE).exists()
    (directory / "lock").touch()
    result, elapsed = _run_op(tmp_path, timeout=120, CXX="false", FASTALIGN_NATIVE_LOCK_TIMEOUT="20")
    lines = result.stdout.splitlines()
    assert lines[0] == "torch True", result.stdout + result.stderr
    assert "the native CPU extension could not be built" in result.stdout  # tried: not blocked
    assert "build lock" not in result.stdout and "waiting" not in result.stderr
    assert not any(path.exists() for path in leftovers)  # the killed build's folder cleaned up
