"""linear_logprobs and linear_divergence with the lm_heads sharded by vocabulary over 2 gloo
processes on the CPU: every rank's outputs and hidden gradient, and each rank's weight/bias
shard gradient, equal the unsharded result; linear_logprobs with one target per row and with
topk_targets."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastalign as fa

WORLD_SIZE = 2
VOCAB_SPLIT = (170, 131)  # uneven shards: offsets come from an all-gather of their sizes


def inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 24, generator=gen)
    weight = torch.randn(sum(VOCAB_SPLIT), 24, generator=gen) * 0.4
    bias = torch.randn(sum(VOCAB_SPLIT), generator=gen)
    targets = torch.randint(0, sum(VOCAB_SPLIT), (3, 7), generator=gen)
    targets[1, 2] = -100
    logits = (hidden @ weight.T + bias).reshape(-1, sum(VOCAB_SPLIT))
    top = logits.argmax(-1).view(3, 7)
    targets[0, :3] = top[0, :3]  # top-1 targets, wherever they fall
    upstream = torch.randn(2, 3, 7, generator=gen)
    # K = 5 ids per row on both shards: some ignored, one row all ignored, one id twice.
    topk = torch.randint(0, sum(VOCAB_SPLIT), (3, 7, 5), generator=gen)
    topk[0, 1, 2:], topk[2, 6], topk[1, 0, 3] = -100, -100, topk[1, 0, 0]
    return hidden, weight, bias, targets, upstream, topk


def run(hidden, weight, bias, targets, upstream, topk, group=None):
    hidden, weight, bias = (x.clone().requires_grad_() for x in (hidden, weight, bias))
    lp, ent, stats = fa.linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                                        return_row_stats=True, temperature=0.9, softcap=6.0,
                                        process_group=group)
    loss = (lp * upstream[0]).sum() + (ent * upstream[1]).sum()
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    topk_lp = fa.linear_logprobs(hidden, weight, topk_targets=topk, bias=bias, temperature=0.9,
                                 softcap=6.0, process_group=group)
    topk_grads = torch.autograd.grad((topk_lp * upstream[0, ..., None]).sum(),
                                     (hidden, weight, bias))
    return [x.detach() for x in (lp, ent, *grads)] + [stats] + [x.detach() for x in
                                                                (topk_lp, *topk_grads)]


def divergence_inputs():
    """Student and teacher heads of different widths over one vocabulary, a mask, upstreams."""
    gen = torch.Generator().manual_seed(1)
    vocab = sum(VOCAB_SPLIT)

    def head(dim, scale):
        return [torch.randn(3, 7, dim, generator=gen),
                torch.randn(vocab, dim, generator=gen) * scale, torch.randn(vocab, generator=gen)]
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 2] = False
    return head(24, 0.4), head(16, 0.5), mask, torch.randn(2, 3, 7, generator=gen)


def run_divergence(student, teacher, mask, upstream, group=None, shard=slice(None)):
    """The JSD and the student's entropy of both heads' rows ``shard``, and the student's
    gradients."""
    hidden, weight, bias = (x.clone().requires_grad_()
                            for x in (student[0], student[1][shard], student[2][shard]))
    divergence, entropy = fa.linear_divergence(
        hidden, weight, teacher[0], teacher[1][shard], bias=bias, teacher_bias=teacher[2][shard],
        beta=0.4, temperature=0.9, softcap=6.0, teacher_softcap=5.0, mask=mask,
        return_entropy=True, process_group=group)
    loss = (divergence * upstream[0]).sum() + (entropy * upstream[1]).sum()
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    return [x.detach() for x in (divergence, entropy, *grads)]


def _worker(rank: int, init_file: str, out_dir: str, backend: str, op: str) -> None:
    os.environ["FASTALIGN_BACKEND"] = backend
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        start = sum(VOCAB_SPLIT[:rank])
        shard = slice(start, start + VOCAB_SPLIT[rank])
        if op == "linear_logprobs":
            hidden, weight, bias, targets, upstream, topk = inputs()
            results = run(hidden, weight[shard], bias[shard], targets, upstream, topk,
                          dist.group.WORLD)
        else:
            results = run_divergence(*divergence_inputs(), group=dist.group.WORLD, shard=shard)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # No rank tears gloo down while the other is still inside the last collective (a rank
        # that did aborted once, "terminate called without an active exception", under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_head_equals_unsharded(backend, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), backend, "linear_logprobs"),
             nprocs=WORLD_SIZE, join=True)
    (lp, ent, grad_hidden, grad_weight, grad_bias, stats,
     topk_lp, topk_hidden, topk_weight, topk_bias) = run(*inputs())
    # Some targets are the top-1 token (inputs()), some are not: both outcomes merge across ranks.
    assert stats["is_top1"].any() and not stats["is_top1"].all()
    start = 0
    for rank, size in enumerate(VOCAB_SPLIT):
        (r_lp, r_ent, r_hidden, r_weight, r_bias, r_stats,
         r_topk_lp, r_topk_hidden, r_topk_weight, r_topk_bias) = torch.load(
            tmp_path / f"rank{rank}.pt")
        for name, value in stats.items():
            torch.testing.assert_close(r_stats[name], value, rtol=1e-5, atol=1e-5)
        shard = slice(start, start + size)
        for actual, expected in [(r_lp, lp), (r_ent, ent), (r_hidden, grad_hidden),
                                 (r_weight, grad_weight[shard]), (r_bias, grad_bias[shard]),
                                 (r_topk_lp, topk_lp), (r_topk_hidden, topk_hidden),
                                 (r_topk_weight, topk_weight[shard]),
                                 (r_topk_bias, topk_bias[shard])]:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        start += size
    assert (lp[1, 2] == 0) and (grad_hidden[1, 2] == 0).all()


@pytest.mark.slow
def test_sharded_heads_diverge_as_unsharded_ones(backend, tmp_path):
    """linear_divergence with both heads sharded by vocabulary: the JSD's two passes merge
    across ranks, the hidden gradient is summed over them."""
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), backend, "linear_divergence"),
             nprocs=WORLD_SIZE, join=True)
    divergence, entropy, grad_hidden, grad_weight, grad_bias = run_divergence(*divergence_inputs())
    start = 0
    for rank, size in enumerate(VOCAB_SPLIT):
        r_div, r_ent, r_hidden, r_weight, r_bias = torch.load(tmp_path / f"rank{rank}.pt")
        for ours, whole in ((r_div, divergence), (r_ent, entropy), (r_hidden, grad_hidden),
                            (r_weight, grad_weight[start:start + size]),
                            (r_bias, grad_bias[start:start + size])):
            torch.testing.assert_close(ours, whole, rtol=1e-5, atol=1e-5)
        start += size
    assert divergence[1, 2] == 0 and (grad_hidden[1, 2] == 0).all()
