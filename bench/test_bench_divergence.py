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
CPU_PROVIDERS = [p for p in bench.PROVIDERS
                 if p not in (bench.FLOOR, bench.CHUNKED_FLOOR, *bench.CUDA_ONLY)]


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


@pytest.mark.slow
def test_chunk_sizes_are_measured_side_by_side(tmp_path, capsys):
    out = tmp_path / "divergence.csv"
    status = harness.main(bench.BENCH, ["--quick", "--providers", "fastalign", "matmul_floor",
                                        "matmul_chunked", "--betas", "1", "--chunk-mb", "0.5",
                                        "2", "--repeats", "1", "--csv", str(out)])
    assert status == 0
    with open(out) as rows_file:
        rows = list(csv.DictReader(rows_file))
    chunked = sorted(float(row["chunk_mb"]) for row in rows if row["provider"] == "fastalign")
    assert chunked == [0.5, 2.0]
    losses = {float(row["loss"]) for row in rows if row["provider"] == "fastalign"}
    assert max(losses) == pytest.approx(min(losses), rel=1e-6)  # chunking changes no result
    floors = sorted(float(row["chunk_mb"]) for row in rows
                    if row["provider"] == "matmul_chunked")
    assert floors == [0.5, 2.0]
    printed = capsys.readouterr().out
    assert "fastalign@0.5MiB / matmul_floor" in printed and "fastalign@2MiB" in printed
    assert "matmul_chunked@0.5MiB / matmul_floor" in printed


def test_chunked_floor_does_the_floors_products():
    """The chunked floor's outputs are the whole-batch products, over several chunks (0.05 MiB
    of a V=5000 vocabulary: 2 rows each): the floor multiplies the logits themselves, so
    dHidden = Z W and dWeight = Z.T H with Z the student's logits."""
    hidden, weight, _, teacher_hidden, teacher_weight = bench.make_inputs(
        dict(QUICK, provider="matmul_chunked"), torch.device("cpu"))
    hidden, weight = hidden.detach(), weight.detach()
    call = bench.chunked_floor_call(hidden, weight, teacher_hidden, teacher_weight, 0.05)
    assert call.rows == 2
    for _ in range(2):  # a second call starts its weight gradient afresh
        call()
    logits = hidden.double() @ weight.double().T
    grad_hidden, grad_weight = call.outputs
    torch.testing.assert_close(grad_hidden.double(), logits @ weight.double(), rtol=1e-5,
                               atol=1e-4)
    torch.testing.assert_close(grad_weight.double(), logits.T @ hidden.double(), rtol=1e-5,
                               atol=1e-4)


def test_chunk_mb_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        harness.main(bench.BENCH, ["--quick", "--chunk-mb", "0"])
    assert exit_info.value.code == 2  # argparse's usage error, before any measurement
    assert "--chunk-mb must be positive, got [0.0]" in capsys.readouterr().err
