"""The cuBLAS path of ``linear_logprobs`` on the Triton backend (``FASTALIGN_CUDA_MATMUL=cublas``:
torch GEMMs per vocabulary slice, the Triton row kernels after them, ops/linear_logprobs_cublas.py)
against the float64 reference, under TRITON_INTERPRET=1 on the CPU as on CUDA.

The op tests of the other modules imported below run again here, with this module's ``backend``
fixture: the Triton backend on the cuBLAS path, slices of 256 columns (V = 301 and 333 end in a
partial one; the vocabulary-sharded test's worker processes inherit the path, not the width). ``test_the_cublas_path_runs`` checks that the path is the one taken.
"""

import pytest
import torch
from conftest import BACKENDS, DEVICE
# Collected again in this module, under its backend fixture.
from test_linear_logprobs import (  # noqa: F401
    test_all_ignored_and_no_rows, test_extreme_logits, test_logprobs_only_and_entropy_only_gradients,
    test_matches_float64_reference, test_strided_hidden_and_weight, test_weight_of_another_dtype)
from test_linear_row_stats import test_row_stats_match_float64  # noqa: F401
from test_sampler_logprobs import (  # noqa: F401
    test_linear_logprobs_match_hf_warpers, test_row_temperature_equals_float_temperature)
from test_topk_targets import test_linear_matches_float64_reference  # noqa: F401
from test_vocab_parallel import test_sharded_head_equals_unsharded  # noqa: F401

import fastalign as fa
from fastalign.ops import _backends, linear_logprobs_cublas

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton backend")


@pytest.fixture
def backend(monkeypatch):
    """The Triton backend on the cuBLAS path, in slices of at least 256 columns."""
    monkeypatch.setenv("FASTALIGN_BACKEND", "triton")
    monkeypatch.setenv(_backends.CUDA_MATMUL_ENV, "cublas")
    monkeypatch.setattr(linear_logprobs_cublas, "TILE_MB", 1e-6)
    return "triton"


def test_the_cublas_path_runs(backend, monkeypatch):
    """Forward and backward go through the cuBLAS launchers, slice by slice, and never through
    the fused Triton tiles."""
    from fastalign.kernels import linear_logprobs as fused_tiles

    calls = {"forward": 0, "backward": 0}
    for name, key in (("linear_logprobs_partials", "forward"),
                      ("linear_logprobs_grad_tile", "backward")):
        original = getattr(linear_logprobs_cublas, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(linear_logprobs_cublas, name, counted)
    for name in ("linear_logprobs_partials", "linear_logprobs_grad_tile"):
        monkeypatch.setattr(fused_tiles, name, lambda *a, **k: pytest.fail("fused tiles ran"))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 16, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(600, 16, generator=gen).to(DEVICE).requires_grad_()
    targets = torch.randint(0, 600, (7,), generator=gen).to(DEVICE)
    assert linear_logprobs_cublas.tile_cols(7, 600) == 256  # three slices
    logprobs = fa.linear_logprobs(hidden, weight, targets)
    logprobs.sum().backward()
    expected = torch.log_softmax((hidden @ weight.T).double(), -1).gather(1, targets[:, None])
    torch.testing.assert_close(logprobs.double(), expected.squeeze(1), rtol=1e-5, atol=1e-5)
    assert calls == {"forward": 1, "backward": 3}


def test_tile_width_follows_the_budget():
    mib = 2**20
    assert linear_logprobs_cublas.tile_cols(8192, 128256) == linear_logprobs_cublas.TILE_MB * mib // (4 * 8192)
    assert linear_logprobs_cublas.tile_cols(8192, 128256) % 128 == 0
    assert linear_logprobs_cublas.tile_cols(10**7, 128256) == 256  # at least 256 columns
    assert linear_logprobs_cublas.tile_cols(3, 1000) == 1000  # never past the vocabulary


def test_an_unknown_matmul_path_is_refused(monkeypatch):
    monkeypatch.setenv(_backends.CUDA_MATMUL_ENV, "cutlass")
    with pytest.raises(ValueError, match=r"FASTALIGN_CUDA_MATMUL='cutlass': choose one of "
                                         r"tiles, cublas"):
        _backends.linear_logprobs_launchers("triton")


def test_the_measured_table_picks_the_path_per_architecture_and_batch(monkeypatch):
    """Without FASTALIGN_CUDA_MATMUL the table decides: per compute capability, the last entry
    whose min_rows the batch reaches; an architecture it does not list, or a CPU tensor, runs
    the fused tiles. The variable overrides the table."""
    table = {(9, 0): ((0, "tiles"), (4096, "cublas")), (10, 0): ((0, "cublas"),)}
    pick = _backends.measured_cuda_matmul
    assert [pick((9, 0), n, table) for n in (1, 4095, 4096, 10**6)] == \
        ["tiles", "tiles", "cublas", "cublas"]
    assert pick((10, 0), 1, table) == "cublas"
    assert pick((8, 0), 10**6, table) == pick(None, 10**6, table) == "tiles"
    # The launchers follow it: an H100 as the device (its capability faked), the table above.
    monkeypatch.delenv(_backends.CUDA_MATMUL_ENV, raising=False)
    monkeypatch.setattr(_backends, "MEASURED_CUDA_MATMUL", table)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    launchers = lambda n: _backends.linear_logprobs_launchers(  # noqa: E731
        "triton", torch.device("cuda"), n).tile_cols
    assert launchers(8192) is linear_logprobs_cublas.tile_cols
    assert launchers(1024) is not linear_logprobs_cublas.tile_cols
    assert _backends.linear_logprobs_launchers("triton", torch.device("cpu"), 8192).tile_cols \
        is not linear_logprobs_cublas.tile_cols
    monkeypatch.setenv(_backends.CUDA_MATMUL_ENV, "tiles")
    assert launchers(8192) is not linear_logprobs_cublas.tile_cols


def test_the_committed_table_is_well_formed():
    """Each entry: a (major, minor) capability, then (min_rows, path) pairs with increasing
    min_rows and known paths."""
    for capability, entries in _backends.MEASURED_CUDA_MATMUL.items():
        assert isinstance(capability, tuple) and len(capability) == 2
        assert all(path in _backends.CUDA_MATMULS for _, path in entries)
        thresholds = [min_rows for min_rows, _ in entries]
        assert thresholds == sorted(set(thresholds)) and thresholds[0] >= 0
