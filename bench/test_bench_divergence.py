"""bench_divergence.py at its --quick shape: every CPU provider computes the same loss and
gradients as eager torch (in this process), a provider whose peer is missing is skipped, and a
run of the script (fresh worker processes, the CSV) measures each provider or says why not:

    OMP_NUM_THREADS=1 pytest -q bench/test_bench_divergence.py
"""

import csv

import pytest
import torch

import bench_divergence as bench
import harness

N, D, D_T, V = bench.SHAPES["quick"]
QUICK = dict(tokens=N, hidden=D, teacher_hidden=D_T, vocab=V, dtype="float32")
CPU_PROVIDERS = [p for p in bench.PROVIDERS if p != bench.FLOOR and p not in bench.CUDA_ONLY]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_providers_agree_with_eager_torch(beta):
    expected = bench.make_call(dict(QUICK, provider="torch_eager", beta=beta), torch.device("cpu"))
    expected_grads = expected()
    for provider in CPU_PROVIDERS:
        if provider == "trl":
            pytest.importorskip("trl")
        call = bench.make_call(dict(QUICK, provider=provider, beta=beta), torch.device("cpu"))
        grad_hidden, grad_weight = call()
        assert grad_hidden.shape == (N, D) and grad_weight.shape == (V, D)
        assert float(call.loss) == pytest.approx(float(expected.loss), rel=1e-5), provider
        for grad, want in zip((grad_hidden, grad_weight), expected_grads):
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-7, msg=provider)


def test_missing_peer_is_skipped(monkeypatch):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    spec = dict(QUICK, provider="trl", beta=1.0, device="cpu", repeats=1)
    assert bench.measure(spec) == {"skipped": "trl not installed"}


@pytest.mark.slow
def test_quick_run_measures_or_says_why(tmp_path, capsys):
    out = tmp_path / "divergence.csv"
    providers = ["fastalign", "trl", "liger", "matmul_floor"]
    status = harness.main(bench.BENCH, ["--quick", "--providers", *providers, "--betas", "0.5",
                                        "--repeats", "1", "--csv", str(out)])
    assert status == 0
    with open(out) as rows_file:
        rows = {row["provider"]: row for row in csv.DictReader(rows_file)}
    assert set(rows) == set(providers)
    assert "needs CUDA" in rows["liger"]["error"]
    for name in ("fastalign", "trl", "matmul_floor"):
        if rows[name]["skipped"]:
            continue
        assert float(rows[name]["time_ms"]) > 0 and rows[name]["peak_mb"] != "", rows[name]
    if not rows["trl"]["skipped"]:
        assert float(rows["trl"]["loss"]) == pytest.approx(float(rows["fastalign"]["loss"]),
                                                           rel=1e-5)
    assert "fastalign / matmul_floor" in capsys.readouterr().out
