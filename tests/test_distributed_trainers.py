"""The trainers on 2 processes (``torchrun --standalone --nproc_per_node 2``, gloo, CPU), DDP and
FSDP2, against one process with the same global batch: DPO, GRPO, PPO and the reward model give
the same first-step loss and gradients (rel 1e-5, fp32) and the same loss curve over 5 steps
(1e-3), distillation (lmbda 0.5: an on-policy step, then an off-policy one, each of 2
micro-batches, the teacher sharded under FSDP2) likewise over its 2 steps; DDP leaves every rank
with the same weights, FSDP2's gathered weights equal the single-process ones; an interrupted
run resumes exactly, on the same processes and on one.
``fastalign train dpo --parallelism fsdp`` on 2 processes: rank 0 alone speaks and writes, the
final model is a plain ``save_pretrained`` directory.

One torchrun launch runs every case (tests/distributed_cases.py); the tests compare."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_cases import (DISTILL_ON_POLICY, DISTILL_STEPS, KINDS, STEPS,
                               distill_trainer, run, trainer_for)
from helpers import small_llama

from fastalign.trainer import byte_tokenizer

pytestmark = pytest.mark.slow
CASES = [f"{kind}-{parallelism}" for kind in KINDS for parallelism in ("ddp", "fsdp")]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """``(directory of the records, stdout)`` of the 2-process run."""
    out, base = tmp_path_factory.mktemp("two-ranks"), tmp_path_factory.mktemp("model")
    small_llama().save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(Path(__file__).parent / "distributed_cases.py"), str(out), str(base)],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return out, result.stdout


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """The same runs on this one process: ``{kind: record}``."""
    out = tmp_path_factory.mktemp("one-rank")
    return {kind: run(trainer_for(kind, out / kind, world_size=1)) for kind in KINDS}


@pytest.fixture(scope="module")
def one_rank_distill(tmp_path_factory):
    """The distillation run on this one process: its record."""
    return run(distill_trainer(tmp_path_factory.mktemp("one-rank-distill"), world_size=1))


def _close(actual: dict, expected: dict, rtol: float, what: str) -> None:
    """Each tensor within ``rtol`` norm-wise: ||actual - expected|| <= rtol ||expected||."""
    assert actual.keys() == expected.keys(), what
    for name in expected:
        error = (actual[name].double() - expected[name].double()).norm()
        assert error <= rtol * expected[name].double().norm() + 1e-12, (
            f"{what} {name}: relative error {error / expected[name].double().norm():.3g} "
            f"> {rtol}")


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_with_the_same_global_batch(two_ranks, one_rank, case):
    two_ranks, _ = two_ranks
    record = torch.load(two_ranks / f"{case}.pt")
    single = one_rank[case.split("-")[0]]
    assert len(record["losses"]) == len(single["losses"]) == STEPS
    assert record["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
    _close(record["grads"], single["grads"], 1e-5, f"{case} first-step gradient of")
    assert record["losses"] == pytest.approx(single["losses"], rel=1e-3)
    # The weights gathered after 5 steps of AdamW (which amplifies rounding in the first
    # steps' tiny second moments): the same run, not the same bits.
    _close(record["weights"], single["weights"], 1e-3, f"{case} final")


@pytest.mark.parametrize("kind", KINDS)
def test_ddp_leaves_every_rank_with_the_same_weights(two_ranks, kind):
    two_ranks, _ = two_ranks
    rank0, rank1 = (torch.load(two_ranks / f"{kind}-ddp.rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


def test_fsdp_run_interrupted_and_resumed_continues_exactly(two_ranks):
    two_ranks, _ = two_ranks
    uninterrupted = torch.load(two_ranks / "dpo-fsdp.pt")
    resumed = torch.load(two_ranks / "dpo-fsdp-resumed.pt")
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"][2:], rel=1e-6)
    _close(resumed["weights"], uninterrupted["weights"], 1e-6, "resumed")


def test_two_rank_fsdp_checkpoint_resumes_on_one_process(two_ranks, tmp_path):
    two_ranks, _ = two_ranks
    uninterrupted = torch.load(two_ranks / "dpo-fsdp.pt")
    checkpoint = two_ranks / "dpo-fsdp-resumed" / "checkpoint-2"
    record = run(trainer_for("dpo", tmp_path, world_size=1), resume=str(checkpoint))
    assert record["losses"] == pytest.approx(uninterrupted["losses"][2:], rel=1e-5)
    _close(record["weights"], uninterrupted["weights"], 1e-4, "resumed on one process")


def test_torchrun_fsdp_dpo_from_the_command_line(two_ranks):
    from transformers import AutoModelForCausalLM

    out, stdout = two_ranks
    run_dir = out / "cli"
    assert stdout.count("done: 2 steps") == 1, stdout  # rank 0 alone prints
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]  # written once, not once per rank
    assert AutoModelForCausalLM.from_pretrained(run_dir).config.vocab_size == 1000
    assert (run_dir / "checkpoint-2" / "fastalign_checkpoint.json").is_file()


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_distill_on_two_ranks_equals_one_process(two_ranks, one_rank_distill, parallelism):
    """lmbda 0.5 draws the same steps on every rank and on one process (step 0 samples from
    the student, step 1 trains on the data), each step of 2 micro-batches per rank; the
    teacher (another width) runs inside the student's forward, sharded under FSDP2."""
    two_ranks, _ = two_ranks
    record = torch.load(two_ranks / f"distill-{parallelism}.pt")
    single = one_rank_distill
    assert record["teacher_sharded"] == (parallelism == "fsdp")
    assert record["teacher_root_resharded"] == (parallelism == "fsdp")
    assert record["on_policy"] == single["on_policy"] == DISTILL_ON_POLICY
    assert len(record["losses"]) == len(single["losses"]) == DISTILL_STEPS
    # Step 0 is on-policy: the same samples on 2 ranks as on one, or the losses would differ.
    assert record["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
    _close(record["grads"], single["grads"], 1e-5, f"distill-{parallelism} first-step gradient of")
    assert record["losses"] == pytest.approx(single["losses"], rel=1e-3)
    _close(record["weights"], single["weights"], 1e-3, f"distill-{parallelism} final")


def test_distill_ddp_leaves_every_rank_with_the_same_weights(two_ranks):
    two_ranks, _ = two_ranks
    rank0, rank1 = (torch.load(two_ranks / f"distill-ddp.rank{r}.pt") for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
