"""linear_logprobs(return_row_stats=True): the mean logit, top-1 hit and log sum p^2 of every row,
from the same pass over the vocabulary, against float64 on every backend (several vocabulary
slices ending in a partial one, soft cap and temperature, ignored rows, ties for the top-1
token, a sharded head); the log-probs, entropy and gradients stay those without the option."""

import pytest
import torch
from conftest import DEVICE, assert_close

import fastalign as fa

STATS = ("mean_logit", "is_top1", "log_sum_sq_probs")


def reference_row_stats(hidden, weight, bias, targets, *, temperature=1.0, softcap=None):
    """float64 ``(mean of z', argmax(z') == target, log sum p^2)``; 0 / False where ignored."""
    z = hidden.double() @ weight.double().T + (0.0 if bias is None else bias.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    log_p = torch.log_softmax(z, dim=-1)
    ignored = targets == -100
    top1 = z.argmax(-1) == targets  # argmax: the first of equal maxima
    stats = {"mean_logit": z.mean(-1), "is_top1": top1 & ~ignored,
             "log_sum_sq_probs": torch.logsumexp(2 * log_p, dim=-1)}
    for name in ("mean_logit", "log_sum_sq_probs"):
        stats[name] = stats[name].masked_fill(ignored, 0.0)
    return stats


def _inputs(rows, dim, vocab, dtype, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(vocab, dim, generator=gen) * (2.0 / dim ** 0.5)
    b = torch.randn(vocab, generator=gen) if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    # Rows whose target is the top-1 token, so both outcomes of is_top1 occur.
    logits = hidden @ weight.T + (0.0 if b is None else b)
    targets[::3] = logits[::3].argmax(-1)
    targets[1] = -100
    to = lambda x: None if x is None else x.to(DEVICE, dtype)  # noqa: E731
    return to(hidden), to(weight), to(b), targets.to(DEVICE)


def _check(stats, expected, dtype):
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert set(stats) == set(STATS)
    assert stats["is_top1"].dtype == torch.bool
    assert torch.equal(stats["is_top1"].cpu(), expected["is_top1"].cpu())
    assert_close(stats["log_sum_sq_probs"], expected["log_sum_sq_probs"], tolerance,
                 "log_sum_sq_probs")
    # A mean near 0 has no relative precision to speak of: compare on the logits' scale.
    error = (stats["mean_logit"].double().cpu() - expected["mean_logit"].cpu()).abs().max()
    assert error <= tolerance * 2.0, f"mean_logit off by {error}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, dict(softcap=3.0, temperature=0.7)],
                         ids=["plain", "softcap_temperature"])
def test_row_stats_match_float64(backend, small_tiles, dtype, options):
    hidden, weight, bias, targets = _inputs(37, 80, 507, dtype)
    lp, ent, stats = fa.linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True,
                                        return_row_stats=True, **options)
    expected = reference_row_stats(hidden, weight, bias, targets, **options)
    _check(stats, expected, dtype)
    plain_lp, plain_ent = fa.linear_logprobs(hidden, weight, targets, bias=bias,
                                             return_entropy=True, **options)
    assert torch.equal(lp, plain_lp) and torch.equal(ent, plain_ent)
    assert stats["is_top1"][::3][1:].any() and not stats["is_top1"].all()


def test_ties_count_only_the_first_maximum(backend, small_tiles):
    """Two vocabulary rows with the same weights give equal logits: the later one is never the
    top-1 token (the first maximum counts, as argmax and TRL's is_top1 do), even when the
    two lie in different slices."""
    hidden, weight, _, _ = _inputs(8, 80, 507, torch.float32, bias=False)
    weight = weight.clone()
    weight[400] = weight[5] = hidden[0] * 10  # row 0's top token twice, far apart
    targets = torch.tensor([5, 400, 0, 1, 2, 3, 4, 6], device=DEVICE)
    _, stats = fa.linear_logprobs(hidden, weight, targets, return_row_stats=True)
    assert bool(stats["is_top1"][0]) and not bool(stats["is_top1"][1])
    expected = reference_row_stats(hidden, weight, None, targets)
    assert torch.equal(stats["is_top1"].cpu(), expected["is_top1"].cpu())


def test_row_stats_leave_the_gradients_alone(backend, small_tiles):
    hidden, weight, bias, targets = _inputs(11, 80, 300, torch.float32, seed=3)
    grads = []
    for row_stats in (False, True):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        result = fa.linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2],
                                    return_row_stats=row_stats)
        lp = result[0] if row_stats else result
        grads.append(torch.autograd.grad(lp.sum(), leaves))
        if row_stats:
            assert not any(s.requires_grad for s in result[1].values())
    for with_stats, without in zip(*grads):
        assert torch.equal(with_stats, without)


def test_row_stats_flag_is_checked():
    hidden, weight, _, targets = _inputs(3, 8, 20, torch.float32)
    with pytest.raises(TypeError, match="return_row_stats"):
        fa.linear_logprobs(hidden, weight, targets, return_row_stats="yes")
