"""Training runs of the distributed tests: DPO, GRPO, PPO, reward models and distillation on
small models, each recorded as its per-step losses, the gradients of its first update and its
final weights (whole, gathered from FSDP2 shards), on whatever number of processes runs this
file.

    torchrun --standalone --nproc_per_node 2 tests/distributed_cases.py OUT_DIR MODEL_DIR

runs every case on 2 gloo processes and writes ``OUT_DIR/<case>.pt`` from rank 0 (and, for DDP,
``<case>.rank<r>.pt``, each rank's own weights); test_distributed_trainers.py runs the same
cases on one process with the same global batch and compares. Last, the same processes run
``fastalign train dpo --parallelism fsdp`` on the saved model ``MODEL_DIR`` through the
command's ``main`` (into ``OUT_DIR/cli``), as ``torchrun -m fastalign`` would: one launch for
all, as each costs ~20 s of start-up here.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import lowercase_share, preference_rows, small_llama, small_policy  # noqa: E402

from fastalign.trainer import (DistillConfig, DistillTrainer, DPOConfig,  # noqa: E402
                               DPOTrainer, GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer,
                               RewardConfig, RewardTrainer, byte_tokenizer, tiny_llama,
                               tiny_reward_model)

GLOBAL_BATCH = 4
KINDS = ("dpo", "grpo", "ppo", "rm")
STEPS = 5
PROMPTS = ["Tell me about owls.", "Hi", "Name a fruit.", "Why is the sky blue?",
           "Count to three.", "Say yes.", "Pick a color.", "Tell a joke."]


# Distillation: 2 steps of 2 micro-batches each (16 rows, two epochs of the 8), lmbda 0.5. Its
# draws are seeded by (seed, step), so with seed 0 step 0 is on-policy (the student samples the
# prompts of both micro-batches, the teacher scores them) and step 1 off-policy (the data's
# completions); ``run`` records which, and the test checks it.
DISTILL_STEPS = 2
DISTILL_ON_POLICY = [1.0, 0.0]


def distill_trainer(output_dir, *, world_size: int, parallelism: str = "ddp"):
    """``small_policy`` (300 tokens, width 32) distilled from a teacher of width 48 over the
    same vocabulary, scaled so that the two distributions differ clearly."""
    teacher = tiny_llama(vocab_size=300, hidden_size=48, num_layers=1, seed=1)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.mul_(4.0)
    rows = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in preference_rows(8)]
    config = DistillConfig(output_dir=str(output_dir), batch_size=GLOBAL_BATCH // world_size,
                           gradient_accumulation_steps=2, max_steps=DISTILL_STEPS,
                           learning_rate=1e-3, lr_schedule="constant", parallelism=parallelism,
                           progress=False, seed=0, lmbda=0.5, beta=0.5, max_new_tokens=6)
    return DistillTrainer(small_policy(), byte_tokenizer(), config, rows, teacher=teacher)


class Interrupted(Exception):
    """Raised in place of a crash, after ``interrupt_after`` steps."""


def trainer_for(kind: str, output_dir, *, world_size: int, parallelism: str = "ddp",
                steps: int = STEPS, save_steps=None):
    common = dict(output_dir=str(output_dir), batch_size=GLOBAL_BATCH // world_size,
                  max_steps=steps, learning_rate=1e-3, lr_schedule="constant",
                  parallelism=parallelism, progress=False, save_steps=save_steps)
    if kind == "dpo":
        return DPOTrainer(small_llama(), byte_tokenizer(), DPOConfig(**common, beta=0.5),
                          preference_rows(8))
    if kind == "rm":
        return RewardTrainer(tiny_reward_model(vocab_size=300, hidden_size=32, seed=2),
                             byte_tokenizer(), RewardConfig(**common), preference_rows(8))
    if kind == "ppo":  # 2 epochs over mini-batches of 2 rollouts per rank (4 in all)
        config = PPOConfig(**common, mini_batch_size=GLOBAL_BATCH // world_size // 2,
                           ppo_epochs=2, max_new_tokens=6)
        return PPOTrainer(small_policy(), byte_tokenizer(), config, PROMPTS,
                          tiny_reward_model(vocab_size=300, hidden_size=32, seed=2),
                          ref_model=small_policy(1))
    config = GRPOConfig(**common, num_generations=2, max_new_tokens=6, beta=0.04,
                        num_iterations=2, clip_low=0.1)
    return GRPOTrainer(small_policy(), byte_tokenizer(), config, PROMPTS, [lowercase_share],
                       ref_model=small_policy(1))


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def run(trainer, *, resume=None, interrupt_after=None) -> dict:
    """Trains; returns ``{"losses", "grads" (first update), "weights"}`` (whole tensors; on
    ranks other than 0 ``weights`` is empty under FSDP2)."""
    record = {"losses": [], "grads": None}
    step, optimizer_step = trainer.training_step, trainer.optimizer_step

    def recording_step():
        if interrupt_after is not None and trainer.step == interrupt_after:
            raise Interrupted(f"stopped after step {interrupt_after}")
        metrics = step()
        record["losses"].append(metrics["loss"])
        if "on_policy" in metrics:  # distillation: whether the step sampled
            record.setdefault("on_policy", []).append(metrics["on_policy"])
        return metrics

    def recording_optimizer_step(loss, grad_norm):
        if record["grads"] is None:
            record["grads"] = {name: _whole(p.grad) for name, p in
                               trainer.model.named_parameters() if p.grad is not None}
        return optimizer_step(loss, grad_norm)

    trainer.training_step, trainer.optimizer_step = recording_step, recording_optimizer_step
    try:
        trainer.train(resume_from=resume)
    except Interrupted:
        pass
    state = trainer.processes.model_state(trainer.model)
    if state is None:  # not sharded: the model's own tensors, a tied weight under one name
        state = dict(trainer.model.named_parameters())
    record["weights"] = {name: tensor.detach().clone() for name, tensor in state.items()}
    return record


CLI_FLAGS = ["train", "dpo", "--device", "cpu", "--parallelism", "fsdp", "--batch-size", "1",
             "--max-length", "48", "--max-steps", "2", "--save-steps", "2", "--no-progress"]


def main(out_dir: str, model_dir: str) -> None:
    from fastalign.cli import main as command

    out = Path(out_dir)
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    for kind in KINDS:
        for parallelism in ("ddp", "fsdp"):
            case = f"{kind}-{parallelism}"
            trainer = trainer_for(kind, out / case, world_size=world_size,
                                  parallelism=parallelism)
            record = run(trainer)
            if parallelism == "ddp":
                torch.save(record["weights"], out / f"{case}.rank{rank}.pt")
            if rank == 0:
                torch.save(record, out / f"{case}.pt")
    for parallelism in ("ddp", "fsdp"):
        case = f"distill-{parallelism}"
        trainer = distill_trainer(out / case, world_size=world_size, parallelism=parallelism)
        record = run(trainer)
        record["teacher_sharded"] = trainer.processes.sharded(trainer.teacher.model)
        # A frozen model's root unit (embeddings, head) is resharded after each forward, not
        # kept gathered for a backward it never has.
        embedding = trainer.teacher.model.get_input_embeddings().weight
        record["teacher_root_resharded"] = type(embedding).__name__ == "DTensor"
        if parallelism == "ddp":
            torch.save(record["weights"], out / f"{case}.rank{rank}.pt")
        if rank == 0:
            torch.save(record, out / f"{case}.pt")
    # An interrupted FSDP2 DPO run, and its resumption on the same processes.
    directory = out / "dpo-fsdp-resumed"
    run(trainer_for("dpo", directory, world_size=world_size, parallelism="fsdp",
                    save_steps=2), interrupt_after=3)
    record = run(trainer_for("dpo", directory, world_size=world_size, parallelism="fsdp",
                             save_steps=2), resume="latest")
    if rank == 0:
        torch.save(record, out / "dpo-fsdp-resumed.pt")
    command([*CLI_FLAGS, "--model", model_dir, "--output", str(out / "cli")])  # leaves the group


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
