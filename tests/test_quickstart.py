"""The README's quick start is a script that runs: examples/quickstart.py, a plain PyTorch DPO
loop over linear_logprobs and dpo_loss on the tiny model."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_trains_and_the_readme_shows_its_code():
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "3", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(value) for value in re.findall(r"loss ([0-9.]+)", done.stdout)]
    assert len(losses) == 3, done.stdout
    assert abs(losses[0] - 0.6931) < 1e-3, done.stdout  # policy = reference: log 2
    assert losses[-1] < losses[0], done.stdout           # DPO steps lower it
    # The README's quick start shows this script's code, and names it.
    readme, script = (ROOT / "README.md").read_text(), SCRIPT.read_text()
    assert "examples/quickstart.py" in readme
    for line in ("fa.linear_logprobs(hidden, head.weight, targets, bias=head.bias).sum(-1)",
                 "hidden = model.model(input_ids).last_hidden_state[:, :-1]",
                 "reference = copy.deepcopy(policy).requires_grad_(False)"):
        assert line in readme and line in script, line
