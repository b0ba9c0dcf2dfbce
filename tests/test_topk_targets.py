"""token_logprobs and linear_logprobs with topk_targets ([..., K] ids per row) against the
float64 reference on every backend: K log-probs, the entropy per row, gradients; ignored entries,
a repeated id, a row with all K ignored, confident rows (p near 1) in bf16, layouts in place."""

import pytest
import torch
from helpers import slow_beyond
from conftest import DEVICE, TOLERANCE, assert_close, relative_error, tolerance_for

import fastalign as fa
from fastalign.reference import linear_logprobs_reference, token_logprobs_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCAB = 1007  # a multiple of no tile
KS = [1, 3, 20]
TRANSFORMS = {"plain": {}, "softcap_temperature": dict(softcap=4.0, temperature=0.7)}


def random_ids(leading, k, vocab, gen, *, ignore_share=0.2):
    """``[*leading, k]`` ids with a share ignored, an id listed twice in the second row and all
    K ignored in the last (rows > 2), never all ignored."""
    ids = torch.randint(0, vocab, (*leading, k), generator=gen)
    ids = ids.masked_fill(torch.rand(ids.shape, generator=gen) < ignore_share, -100)
    rows = ids.view(-1, k)
    rows[0, 0] = 5
    if k > 1:
        rows[1, 1] = rows[1, 0] = 7
    if rows.shape[0] > 2:
        rows[-1] = -100
    return ids.to(DEVICE)


def upstream_like(logprobs, entropy, gen):
    return (torch.randn(logprobs.shape, generator=gen).to(DEVICE),
            torch.randn(entropy.shape, generator=gen).to(DEVICE))


def token_run(fn, logits, ids, upstream, **options):
    """(logprobs, entropy, logits gradient) of ``sum(g_lp lp) + sum(g_ent ent)``."""
    leaf = logits.detach().clone().requires_grad_()
    logprobs, entropy = fn(leaf * 1, topk_targets=ids, return_entropy=True, **options)
    loss = (logprobs * upstream[0]).sum() + (entropy * upstream[1]).sum()
    return logprobs, entropy, torch.autograd.grad(loss, leaf)[0]


def check_ignored(ids, logprobs, entropy, row_grad):
    ignored = ids == -100
    assert (logprobs[ignored] == 0).all()
    all_ignored = ignored.all(-1)
    assert (entropy[all_ignored] == 0).all() and (row_grad[all_ignored] == 0).all()


@pytest.mark.parametrize("k", slow_beyond(KS, fast=[1, 20]))
@pytest.mark.parametrize("dtype", slow_beyond(DTYPES, fast=[torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
def test_token_matches_float64_reference(backend, k, dtype, transform):
    gen = torch.Generator().manual_seed(k)
    logits = (torch.randn(2, 3, VOCAB, generator=gen) * 4).to(DEVICE, dtype)
    ids = random_ids((2, 3), k, VOCAB, gen)
    upstream = (torch.randn(2, 3, k, generator=gen).to(DEVICE),
                torch.randn(2, 3, generator=gen).to(DEVICE))
    lp, ent, grad = token_run(fa.token_logprobs, logits, ids, upstream, **transform)
    ref_lp, ref_ent, ref_grad = token_run(token_logprobs_reference, logits, ids, upstream,
                                          **transform)
    assert lp.shape == ids.shape and ent.shape == (2, 3) and lp.dtype == torch.float32
    assert grad.dtype == dtype
    for name, actual, expected in (("logprobs", lp, ref_lp), ("entropy", ent, ref_ent),
                                   ("grad", grad, ref_grad)):
        assert_close(actual, expected, TOLERANCE[dtype], name)
    check_ignored(ids, lp, ent, grad)


def test_token_slice_in_place_with_small_tiles(backend, small_tiles):
    """The [:, :-1] slice of [B, T, V] logits read in place and its gradient written over it
    (inplace_backward): the K columns land in the right rows of a strided layout."""
    gen = torch.Generator().manual_seed(4)
    full = (torch.randn(2, 6, 507, generator=gen) * 3).to(DEVICE, torch.float16)
    ids = random_ids((2, 5), 3, 507, gen)
    upstream = (torch.randn(2, 5, 3, generator=gen).to(DEVICE), torch.zeros(2, 5, device=DEVICE))
    ref_lp, _, ref_grad = token_run(token_logprobs_reference, full[:, :-1], ids, upstream)
    leaf = full.clone().requires_grad_()
    logits = leaf * 1
    lp = fa.token_logprobs(logits[:, :-1], topk_targets=ids, inplace_backward=True)
    (lp * upstream[0]).sum().backward()
    assert_close(lp, ref_lp, TOLERANCE[torch.float16], "logprobs")
    assert_close(leaf.grad[:, :-1], ref_grad, TOLERANCE[torch.float16], "grad")
    assert (leaf.grad[:, -1] == 0).all()


def test_one_target_per_row_agrees_with_targets(backend):
    """topk_targets with K = 1 is targets, values and gradients."""
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(31, 300, generator=gen) * 3).to(DEVICE)
    targets = torch.randint(0, 300, (31,), generator=gen).to(DEVICE)
    targets[3] = -100
    grads = []
    for call in (lambda x: fa.token_logprobs(x, targets, softcap=6.0),
                 lambda x: fa.token_logprobs(x, topk_targets=targets[:, None], softcap=6.0)[:, 0]):
        leaf = logits.clone().requires_grad_()
        logprobs = call(leaf)
        grads.append((logprobs, torch.autograd.grad((logprobs * logprobs).sum(), leaf)[0]))
    assert_close(grads[1][0], grads[0][0], 1e-6, "logprobs")
    assert_close(grads[1][1], grads[0][1], 1e-6, "grad")


@pytest.mark.parametrize("op", ["token", "linear"])
def test_confident_rows_in_bf16(backend, op):
    """Rows whose top token holds p ~ 0.99, the token among the K: its gradient column is
    -G p + g, a small difference that must be formed before the bf16 rounding."""
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(9, 32, generator=gen)
    weight = torch.randn(VOCAB, 32, generator=gen) * 0.05
    top = torch.randint(0, VOCAB, (9,), generator=gen)
    weight[top] = hidden * (12.0 / hidden.norm(dim=1, keepdim=True) ** 2)  # logit 12 at its row
    ids = torch.stack([top, torch.randint(0, VOCAB, (9,), generator=gen)], 1).to(DEVICE)
    upstream = torch.rand(9, 2, generator=gen).to(DEVICE) + 0.5
    hidden, weight = hidden.to(DEVICE, torch.bfloat16), weight.to(DEVICE, torch.bfloat16)
    if op == "token":
        logits = hidden.float() @ weight.float().T
        ours = token_run(fa.token_logprobs, logits.bfloat16(), ids, (upstream, 0 * upstream[:, 0]))
        exact = token_run(token_logprobs_reference, logits.bfloat16(), ids,
                          (upstream, 0 * upstream[:, 0]))
        pairs = [(ours[0], exact[0]), (ours[2], exact[2])]
    else:
        leaves = [x.requires_grad_() for x in (hidden, weight)]
        lp = fa.linear_logprobs(*leaves, topk_targets=ids)
        exact_leaves = [x.detach().double().requires_grad_() for x in leaves]
        ref = linear_logprobs_reference(*exact_leaves, topk_targets=ids)
        pairs = [(lp, ref)] + list(zip(torch.autograd.grad((lp * upstream).sum(), leaves),
                                       torch.autograd.grad((ref * upstream).sum(), exact_leaves)))
    assert pairs[0][1][:, 0].exp().min() > 0.95
    for actual, expected in pairs:
        assert_close(actual, expected, TOLERANCE[torch.bfloat16], op)


def linear_run(fn, leaves, ids, upstream, **options):
    hidden, weight, *bias = leaves
    lp, ent = fn(hidden, weight, topk_targets=ids, bias=bias[0] if bias else None,
                 return_entropy=True, **options)
    loss = (lp * upstream[0]).sum() + (ent * upstream[1]).sum()
    return [lp, ent, *torch.autograd.grad(loss, [x for x in leaves if x.requires_grad])]


# Every K and every dtype, not every pair (the Triton interpreter is slow on fused-linear tiles).
LINEAR_CASES = [(1, torch.float32), (3, torch.bfloat16), (20, torch.float16), (20, torch.bfloat16)]


@pytest.mark.parametrize("k,dtype", [  # the first two in the fast tier, all in make test
    pytest.param(k, d, id=f"{k}-{d}", marks=[] if i < 2 else [pytest.mark.slow])
    for i, (k, d) in enumerate(LINEAR_CASES)])
@pytest.mark.parametrize("options", TRANSFORMS.values(), ids=TRANSFORMS.keys())
def test_linear_matches_float64_reference(backend, small_tiles, k, dtype, options):
    """Small tiles: V = 1007 crosses many vocabulary splits and gradient slices, D = 40 ends in
    a partial block. Tolerances as tests/test_linear_logprobs.py's: never looser than 1.5x the
    error of torch's own path in the dtype."""
    gen = torch.Generator().manual_seed(10 + k)
    leaves = [torch.randn(2, 5, 40, generator=gen), torch.randn(VOCAB, 40, generator=gen) * 0.3]
    if options:
        leaves.append(torch.randn(VOCAB, generator=gen))
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in leaves]
    ids = random_ids((2, 5), k, VOCAB, gen)
    upstream = (torch.randn(2, 5, k, generator=gen).to(DEVICE),
                torch.randn(2, 5, generator=gen).to(DEVICE))
    ours = linear_run(fa.linear_logprobs, leaves, ids, upstream, **options)
    exact = linear_run(linear_logprobs_reference,
                       [x.detach().double().requires_grad_() for x in leaves], ids, upstream,
                       **options)
    own = linear_run(lambda *a, **kw: linear_logprobs_reference(*a, compute_dtype=torch.float32,
                                                                **kw),
                     leaves, ids, upstream, **options)
    names = ["logprobs", "entropy", "grad hidden", "grad weight", "grad bias"]
    for name, actual, expected, theirs in zip(names, ours, exact, own):
        assert_close(actual, expected, tolerance_for(dtype, relative_error(theirs, expected)),
                     name)
    check_ignored(ids, ours[0], ours[1], ours[2])


def test_linear_weight_of_another_dtype_and_frozen_head(backend):
    """bf16 hidden states against fp32 master weights (autocast), and a frozen weight."""
    gen = torch.Generator().manual_seed(12)
    hidden = torch.randn(13, 48, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    weight = (torch.randn(300, 48, generator=gen) * 0.3).to(DEVICE).requires_grad_()
    ids = random_ids((13,), 4, 300, gen)
    upstream = torch.randn(13, 4, generator=gen).to(DEVICE)
    lp = fa.linear_logprobs(hidden, weight, topk_targets=ids)
    grads = torch.autograd.grad((lp * upstream).sum(), (hidden, weight))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32]
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    ref = linear_logprobs_reference(*exact, topk_targets=ids)
    for actual, expected in zip([lp, *grads],
                                [ref, *torch.autograd.grad((ref * upstream).sum(), exact)]):
        assert_close(actual, expected, TOLERANCE[torch.bfloat16], "autocast")
    frozen = fa.linear_logprobs(hidden, weight.detach(), topk_targets=ids, return_entropy=True)
    (grad_hidden,) = torch.autograd.grad(frozen[1].sum(), hidden)  # entropy alone
    ref_ent = linear_logprobs_reference(exact[0], exact[1].detach(), topk_targets=ids,
                                        return_entropy=True)[1]
    assert_close(grad_hidden, torch.autograd.grad(ref_ent.sum(), exact[0])[0],
                 TOLERANCE[torch.bfloat16], "entropy alone")


def test_all_ignored_and_no_rows(backend):
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(3, 4, 50, generator=gen).to(DEVICE).requires_grad_()
    hidden = torch.randn(3, 4, 16, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(50, 16, generator=gen).to(DEVICE).requires_grad_()
    ids = torch.full((3, 4, 5), -100, device=DEVICE)
    for lp, ent in (fa.token_logprobs(logits, topk_targets=ids, return_entropy=True),
                    fa.linear_logprobs(hidden, weight, topk_targets=ids, return_entropy=True)):
        assert lp.shape == (3, 4, 5) and ent.shape == (3, 4)
        assert (lp == 0).all() and (ent == 0).all()
    grads = torch.autograd.grad((lp.sum() + ent.sum()), (hidden, weight))
    assert all((g == 0).all() for g in grads)
    empty = fa.token_logprobs(logits[:0], topk_targets=ids[:0], return_entropy=True)
    assert empty[0].shape == (0, 4, 5) and empty[1].shape == (0, 4)
    empty = fa.linear_logprobs(hidden[:0], weight, topk_targets=ids[:0])
    assert empty.shape == (0, 4, 5)
    assert (torch.autograd.grad(empty.sum(), weight)[0] == 0).all()
