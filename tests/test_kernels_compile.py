"""Every Triton kernel compiles for a Hopper GPU (sm_90) on this CPU-only machine, and the
fused-linear kernels' main loops are software-pipelined: see compile_kernels.py."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None or not _nvidia_backend(),
                    reason="needs triton with its NVIDIA backend (ptxas ships in the wheel)")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernels.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) >= 20 and all(line.startswith("ok ") for line in lines), done.stdout
    linear = [line for line in lines if line.startswith("ok linear")]
    assert all("pipelined True" in line for line in linear), "\n".join(linear)
