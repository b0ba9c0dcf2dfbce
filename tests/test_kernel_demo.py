"""The kernel demo, `python -m fastalign.kernel_demo` (`fastalign bench`), end to end on a small size."""

import subprocess
import sys

import pytest

from fastalign.kernel_demo import WAYS


@pytest.mark.slow
def test_demo_runs_and_reports_every_way():
    done = subprocess.run(
        [sys.executable, "-m", "fastalign.kernel_demo", "--device", "cpu", "--tokens", "16",
         "--hidden", "32", "--vocab", "3000", "--repeats", "1"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for label in WAYS:
        (row,) = [line for line in lines if line.startswith(label)]
        milliseconds, peak_mb = (float(value) for value in row[len(label):].split()[:2])
        assert milliseconds >= 0 and peak_mb >= 0, row  # tiny sizes: the values are noise
    for way in ("token", "linear"):
        (row,) = [line for line in lines if line.strip().startswith(way + " ")]
        assert all(float(value) < 1e-4 for value in row.split()[1:]), row
