"""The README's main command, `python -m fastalign.demo`, end to end on a small size."""

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_and_reports_both_ways():
    done = subprocess.run(
        [sys.executable, "-m", "fastalign.demo", "--device", "cpu", "--batch", "1", "--seq", "16",
         "--vocab", "3000", "--repeats", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for label in ("naive torch (log_softmax + gather)", "fastalign.token_logprobs"):
        (row,) = [line for line in lines if line.startswith(label)]
        milliseconds, peak_mb = (float(value) for value in row[len(label):].split()[:2])
        assert milliseconds >= 0 and peak_mb >= 0, row  # tiny sizes: the values are noise
    assert "largest difference" in done.stdout
    difference = float(done.stdout.split("log-probs ")[-1].split(",")[0])
    assert difference < 1e-4
