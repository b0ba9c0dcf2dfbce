"""``torchrun --standalone --nproc_per_node 2 -m fastalign train dpo --parallelism fsdp`` on a
small saved model (CPU, gloo): one rank speaks and writes, the run's final model is a plain
``save_pretrained`` directory beside its checkpoint. (Resumption on several processes:
test_distributed_trainers.py; one launch here, as each costs ~20 s of start-up.)"""

import json
import os
import subprocess
import sys

import pytest
from helpers import small_llama

from fastalign.trainer import byte_tokenizer

pytestmark = pytest.mark.slow


def _torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "fastalign", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_torchrun_fsdp_dpo_from_the_command_line(tmp_path):
    from transformers import AutoModelForCausalLM

    base, out = tmp_path / "base", tmp_path / "run"
    small_llama().save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    flags = ["train", "dpo", "--model", str(base), "--device", "cpu", "--parallelism", "fsdp",
             "--batch-size", "1", "--max-length", "48", "--save-steps", "2", "--no-progress",
             "--output", str(out)]
    result = _torchrun(*flags, "--max-steps", "2")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("done: 2 steps") == 1, result.stdout  # rank 0 alone prints
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]  # written once, not once per rank
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 1000
    assert (out / "checkpoint-2" / "fastalign_checkpoint.json").is_file()
