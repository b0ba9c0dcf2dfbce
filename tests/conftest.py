"""Shared fixtures: the device under test, backends, NaN-poisoned allocations, tolerances.

Without CUDA the Triton kernels run through the interpreter; TRITON_INTERPRET must be set before
triton.jit defines them, i.e. before fastalign.kernels is first imported, hence here at the top.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastalign  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Every backend that can run here: on a CPU, the Triton interpreter, the native C++ kernels
# (built on first use; tests/test_native.py fails if a compiler is present and they do not
# build) and the torch path.
BACKENDS = fastalign.available_backends(DEVICE)

# Worst relative error (norm-wise) against a float64 reference, per input dtype (DESIGN.md).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def pytest_collection_modifyitems(config, items):
    if DEVICE.type != "cuda":
        skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.sh runs these)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Runs the test once per backend available on DEVICE, forced through FASTALIGN_BACKEND."""
    monkeypatch.setenv("FASTALIGN_BACKEND", request.param)
    return request.param


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrinks Triton tiles and torch chunks so small vocabularies cross several of them and end
    in a partial one (V=507 -> 4 tiles of 128, the last holding 123 columns)."""
    from fastalign.kernels import divergence, linear_logprobs, token_logprobs
    from fastalign.ops import _tiles, token_logprobs_torch

    for module in (token_logprobs, divergence):
        for name in ("FORWARD_BLOCK_V", "BACKWARD_BLOCK_V"):
            monkeypatch.setattr(module, name, 128)
    monkeypatch.setattr(token_logprobs_torch, "CHUNK_ELEMENTS", 1024)
    # Fused-linear tiles: 16 x 32 x 32 blocks (D = 80 ends in a partial block), several
    # vocabulary splits in forward and slices in backward; torch tiles of 256 columns.
    linear = linear_logprobs
    for prefix in ("FORWARD", "GRAD"):
        monkeypatch.setattr(linear, f"{prefix}_BLOCK_N", 16)
        monkeypatch.setattr(linear, f"{prefix}_BLOCK_V", 32)
        monkeypatch.setattr(linear, f"{prefix}_BLOCK_D", 32)
        monkeypatch.setattr(linear, f"{prefix}_NUM_WARPS", 2)
    monkeypatch.setattr(linear, "FORWARD_TARGET_PROGRAMS", 8)
    monkeypatch.setattr(linear, "GRAD_TILE_ELEMENTS", 64 * 128)
    monkeypatch.setattr(_tiles, "TILE_ELEMENTS", 1024)


@pytest.fixture
def chunk_counts(monkeypatch):
    """The chunk count of every gradient-in-forward pass (``ops/linear_loss.run``) in the test:
    empty when the two-pass path ran instead."""
    from fastalign.ops import linear_loss

    counts, run = [], linear_loss.run

    def counting(hidden, weight, bias, plan, **needs):
        counts.append(len(plan.chunks))
        return run(hidden, weight, bias, plan, **needs)
    monkeypatch.setattr(linear_loss, "run", counting)
    return counts


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    """Every float tensor from torch.empty / empty_like starts as NaN, so an output element a
    kernel forgot to write fails the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(tensor):
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are all zeros)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual).all(), "non-finite values where the reference is finite"
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(actual, expected, tolerance, what=""):
    error = relative_error(actual, expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:.3g}"


def tolerance_for(dtype: torch.dtype, torch_error: float = 0.0) -> float:
    """DESIGN.md's bound for ``dtype``, loosened only to 1.5x what torch itself reaches in that
    dtype (a bf16 matmul rounds the logits before anyone can do better)."""
    return max(TOLERANCE[dtype], 1.5 * torch_error)
