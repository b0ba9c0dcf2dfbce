"""fastalign's fused head (fastalign.integrations.trl) on an FSDP2-sharded model over 2 gloo
processes on the CPU: the head is sharded on its own (its parameters reach the fused forward as
DTensors, since the head module itself never runs) and gathered there, as TRL's head does. The
ranks bring different rows (data parallel): every rank's log-probs and loss equal the unsharded
model's on that rank's rows, and the head's gradient, gathered from the shards, is the average
of the two ranks' unsharded gradients (FSDP2's convention for every other parameter)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow
WORLD_SIZE = 2


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def _batch(rank):
    gen = torch.Generator().manual_seed(1 + rank)
    ids = torch.randint(0, 301, (2, 9), generator=gen)
    labels = ids.clone()
    labels[rank, :3] = -100
    return ids, labels


def _run(model, rank):
    import fastalign.integrations.trl as fatrl
    fatrl.add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
    ids, labels = _batch(rank)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    out.loss.backward()
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        model = _model()
        fully_shard(model.lm_head)
        fully_shard(model)
        out = _run(model, rank)
        grad = model.lm_head.weight.grad.full_tensor()
        torch.save([out.log_probs.detach(), out.entropy.detach(), out.loss.detach(), grad],
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other is in the last collective
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_head_equals_unsharded(tmp_path):
    pytest.importorskip("trl")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    expected = []
    for rank in range(WORLD_SIZE):
        model = _model()
        out = _run(model, rank)
        expected.append([out.log_probs.detach(), out.entropy.detach(), out.loss.detach(),
                         model.lm_head.weight.grad])
    average = sum(e[3] for e in expected) / WORLD_SIZE
    assert not torch.allclose(average, expected[0][3], rtol=1e-3)  # the ranks' data differ
    for rank in range(WORLD_SIZE):
        wanted_all = expected[rank][:3] + [average]
        for name, actual, wanted in zip(("log_probs", "entropy", "loss", "lm_head grad"),
                                        torch.load(tmp_path / f"rank{rank}.pt"), wanted_all):
            torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
