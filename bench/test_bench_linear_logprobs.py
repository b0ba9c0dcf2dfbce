"""CPU timings through pytest-benchmark, on the providers and inputs of bench_linear_logprobs.py
(both ops):

    pytest bench --benchmark-only

Time only; peak memory needs a fresh process per measurement, which bench_linear_logprobs.py
does. Liger and cut-cross-entropy have no CPU path and are skipped.
"""

import pytest
import torch

import bench_linear_logprobs as bench

SIZE = dict(tokens=256, hidden=256, vocab=32768, dtype="float32")
CASES = [(op, provider) for op, providers in bench.PROVIDERS.items() for provider in providers]


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("op,provider", CASES)
def test_linear_ops_cpu(benchmark, op, provider, mode):
    if provider in bench.CUDA_ONLY:
        pytest.skip(f"{provider} needs CUDA")
    if provider == "trl":
        pytest.importorskip("trl")
    call = bench.make_call(dict(SIZE, op=op, provider=provider, mode=mode), torch.device("cpu"))
    call()  # compile outside the timing
    benchmark.pedantic(call, rounds=5, warmup_rounds=1)
