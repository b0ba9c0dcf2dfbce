"""CPU timings through pytest-benchmark, on the providers and inputs of bench_token_logprobs.py:

    pytest bench --benchmark-only

Time only; peak memory needs a fresh process per measurement, which bench_token_logprobs.py does.
"""

import pytest
import torch

import bench_token_logprobs as bench

SIZE = dict(batch=1, seq=512, vocab=32768, dtype="float32")


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_token_logprobs_cpu(benchmark, provider, mode):
    if provider == "trl":
        pytest.importorskip("trl")
    call = bench.make_call(dict(SIZE, provider=provider, mode=mode), torch.device("cpu"))
    call()  # compile outside the timing
    benchmark.pedantic(call, rounds=5, warmup_rounds=1)
