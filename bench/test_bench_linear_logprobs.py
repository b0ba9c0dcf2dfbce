"""CPU timings through pytest-benchmark, on the providers and inputs of bench_linear_logprobs.py:

    pytest bench --benchmark-only

Time only; peak memory needs a fresh process per measurement, which bench_linear_logprobs.py
does. Liger and cut-cross-entropy have no CPU path and are skipped.
"""

import pytest
import torch

import bench_linear_logprobs as bench

SIZE = dict(tokens=256, hidden=256, vocab=32768, dtype="float32")


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_linear_logprobs_cpu(benchmark, provider, mode):
    if provider in bench.CUDA_ONLY:
        pytest.skip(f"{provider} needs CUDA")
    if provider == "trl":
        pytest.importorskip("trl")
    if provider == "fastalign" and not hasattr(pytest.importorskip("fastalign"), "linear_logprobs"):
        pytest.skip("fastalign.linear_logprobs not there yet")
    call = bench.make_call(dict(SIZE, provider=provider, mode=mode), torch.device("cpu"))
    call()  # compile outside the timing
    benchmark.pedantic(call, rounds=5, warmup_rounds=1)
