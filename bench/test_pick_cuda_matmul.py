"""bench/pick_cuda_matmul.py on a made-up CSV: the entry it prints is the measurements'."""

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pick_cuda_matmul as pick  # noqa: E402

FIELDS = ["op", "provider", "mode", "shape", "n_rows", "time_ms", "device", "commit"]


def write(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        for provider, mode, shape, n_rows, ms in rows:
            writer.writerow(dict(op="linear_logprobs", provider=provider, mode=mode, shape=shape,
                                 n_rows=n_rows, time_ms=ms, device="GPU X", commit="abc1234"))


def test_cublas_from_the_smallest_batch_it_wins_on_every_shape_from(tmp_path, capsys):
    rows = [("fastalign", "fwd_bwd", "llama3", 8192, 60.0),
            ("fastalign_cublas", "fwd_bwd", "llama3", 8192, 50.0),
            ("fastalign", "fwd_bwd", "gemma2", 8192, 70.0),
            ("fastalign_cublas", "fwd_bwd", "gemma2", 8192, 65.0),
            ("fastalign", "fwd_bwd", "llama3", 2048, 15.0),  # wins here on one shape only
            ("fastalign_cublas", "fwd_bwd", "llama3", 2048, 14.0),
            ("fastalign", "fwd_bwd", "gemma2", 2048, 15.0),
            ("fastalign_cublas", "fwd_bwd", "gemma2", 2048, 16.0),
            ("fastalign", "fwd", "llama3", 1024, 1.0),  # forward only: not read
            ("fastalign_cublas", "fwd", "llama3", 1024, 9.0),
            ("trl", "fwd_bwd", "llama3", 8192, 1.0)]  # another provider: not read
    write(tmp_path / "run.csv", rows)
    assert pick.main([str(tmp_path / "run.csv"), "--capability", "9.0"]) == 0
    printed = capsys.readouterr().out
    assert "MEASURED_CUDA_MATMUL[(9, 0)] = ((8192, 'cublas'),)  # GPU X, sweep at abc1234" \
        in printed
    assert "N=2048   gemma2   tiles 15.00  cublas 16.00  cublas/tiles 1.07x" in printed


def test_no_entry_where_cublas_never_wins(tmp_path, capsys):
    write(tmp_path / "run.csv", [("fastalign", "fwd_bwd", "llama3", 8192, 50.0),
                                 ("fastalign_cublas", "fwd_bwd", "llama3", 8192, 60.0)])
    assert pick.main([str(tmp_path / "run.csv")]) == 0
    assert "no entry for GPU X: the cuBLAS path did not win" in capsys.readouterr().out
    write(tmp_path / "one.csv", [("fastalign", "fwd_bwd", "llama3", 8192, 50.0)])
    assert pick.main([str(tmp_path / "one.csv")]) == 0
    assert "no entry for GPU X: no batch has both paths measured" in capsys.readouterr().out
    write(tmp_path / "empty.csv", [("trl", "fwd_bwd", "llama3", 8192, 50.0)])
    assert pick.main([str(tmp_path / "empty.csv")]) == 1
