"""The ``fastalign`` command and the demo, end to end in subprocesses (small settings)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import preference_rows, run_cli

# Trains models or runs the command: the slow tier (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow


def test_help_explains_every_flag():
    done = run_cli("train", "dpo", "--help")
    assert done.returncode == 0, done.stderr
    for flag in ("--model", "--data", "--config", "--resume", "--beta", "--loss-type",
                 "--gradient-accumulation-steps", "--reference", "--precision"):
        assert flag in done.stdout, flag
    assert "KL regularization" in done.stdout  # flags carry explanations, not only names


def test_train_dpo_then_resume_from_the_command_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(8)))
    config = tmp_path / "dpo.yaml"
    config.write_text("batch_size: 4\nlearning_rate: 0.001\nsave_steps: 1\n")
    common = ["train", "dpo", "--model", "tiny", "--data", str(data), "--config", str(config),
              "--output", str(tmp_path / "run"), "--no-progress"]
    done = run_cli(*common, "--max-steps", "1")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "checkpoint-1" / "model.safetensors").is_file()
    done = run_cli(*common, "--max-steps", "2", "--resume", "latest")
    assert done.returncode == 0, done.stderr
    assert "done: 2 steps" in done.stdout
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2]


def test_errors_are_one_line_messages(tmp_path):
    done = run_cli("train", "dpo", "--data", str(tmp_path / "missing.jsonl"))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("fastalign: error: preference data")
    done = run_cli("train", "rm", "--loss-type", "sigmoid")  # a DPO flag on the reward trainer
    assert done.returncode != 0 and "unrecognized arguments: --loss-type" in done.stderr


def test_demo_runs_end_to_end_on_a_short_schedule(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastalign.demo", "--steps", "2",
                           "--max-pairs", "16", "--batch-size", "2",
                           "--output", str(tmp_path / "demo"), "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "held-out preference accuracy" in out and "DPO loss" in out
    fused, unfused = (int(line.split()[-2]) for line in out.splitlines()
                      if line.strip().startswith(("fastalign (linear_logprobs", "unfused (logits")))
    assert 0 < fused < unfused, out
    assert (tmp_path / "demo" / "metrics.png").is_file()


def _workers_broken(tmp_path):
    """An environment in which every `--worker` subprocess dies at start with an error, as the
    memory workers once did when a top-level `kernels` shadowed the one transformers imports."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if '--worker' in sys.argv:\n"
        "    sys.stderr.write('Traceback (most recent call last):\\n'\n"
        "                     'ImportError: worker broken on purpose\\n')\n"
        "    sys.stderr.flush()\n"
        "    os._exit(3)\n")
    return dict(os.environ, PYTHONPATH=str(site))


def test_demo_fails_with_the_workers_error_when_a_measurement_fails(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastalign.demo", "--steps", "1",
                           "--max-pairs", "4", "--batch-size", "2",
                           "--output", str(tmp_path / "demo"), "--no-progress"],
                          capture_output=True, text=True, timeout=600, env=_workers_broken(tmp_path))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "failed: exit 3: ImportError: worker broken on purpose" in done.stdout
    assert "the memory measurement failed for fused: exit 3" in done.stderr
    assert "Traceback (most recent call last)" in done.stderr  # the worker's own error, in full


def test_kernel_demo_fails_when_a_measurement_fails(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastalign.kernel_demo", "--device", "cpu",
                           "--tokens", "8", "--hidden", "16", "--vocab", "300", "--repeats", "1"],
                          capture_output=True, text=True, timeout=300, env=_workers_broken(tmp_path))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "ImportError: worker broken on purpose" in done.stderr
