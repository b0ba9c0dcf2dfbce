"""linear_logprobs against the float64 reference on every backend: log-probs, entropy and the
gradients of hidden, weight and bias; TRL's ChunkedLogProbFunction on the same inputs."""

import pytest
import torch
from conftest import DEVICE, TOLERANCE, assert_close, relative_error, tolerance_for

import fastalign as fa
from fastalign.ops import _linear_backward
from fastalign.reference import linear_logprobs_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = {"plain": {}, "bias_softcap_temperature": dict(softcap=4.0, temperature=0.7)}


def random_head(shape, hidden_dim, vocab, dtype, *, bias=False, ignore_share=0.2, seed=0):
    """Hidden states, an lm_head giving logits of std ~2, optional bias, targets with a share
    ignored (never all), all leaves in ``dtype``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(*shape, hidden_dim, generator=gen)
    weight = torch.randn(vocab, hidden_dim, generator=gen) * (2.0 / hidden_dim ** 0.5)
    targets = torch.randint(0, vocab, shape, generator=gen)
    ignored = torch.rand(shape, generator=gen) < ignore_share
    ignored.view(-1)[0] = False
    leaves = [hidden, weight] + ([torch.randn(vocab, generator=gen)] if bias else [])
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in leaves]
    return leaves, targets.masked_fill(ignored, -100).to(DEVICE)


def forward_backward(fn, leaves, targets, upstream, **options):
    """(logprobs, entropy, grads of every leaf) of ``sum(g_lp * lp + g_ent * ent)``."""
    hidden, weight, *bias = leaves
    lp, ent = fn(hidden, weight, targets, bias=bias[0] if bias else None, return_entropy=True,
                 **options)
    loss = (lp * upstream[0]).sum() + (ent * upstream[1]).sum()
    return lp, ent, torch.autograd.grad(loss, [x for x in leaves if x.requires_grad])


def check_against_reference(leaves, targets, **options):
    upstream = [torch.randn(targets.shape, device=DEVICE) for _ in range(2)]
    ours = forward_backward(fa.linear_logprobs, leaves, targets, upstream, **options)
    exact_leaves = [x.detach().double().requires_grad_(x.requires_grad) for x in leaves]
    exact = forward_backward(linear_logprobs_reference, exact_leaves, targets, upstream, **options)
    dtype = leaves[0].dtype
    # What torch itself reaches in this dtype (matmul in it, softmax in fp32): the tolerance
    # may not be tighter than that (bf16 logits, fp32 logits near 1000).
    own = forward_backward(
        lambda *a, **k: linear_logprobs_reference(*a, compute_dtype=torch.float32, **k),
        leaves, targets, upstream, **options)
    names = ["logprobs", "entropy"] + [f"grad {n}" for n in ("hidden", "weight", "bias")]
    for index, (name, actual, expected) in enumerate(
            zip(names, [ours[0], ours[1], *ours[2]], [exact[0], exact[1], *exact[2]])):
        torch_error = relative_error([own[0], own[1], *own[2]][index], expected)
        assert_close(actual, expected, tolerance_for(dtype, torch_error), name)
    return ours


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_matches_float64_reference(backend, small_tiles, dtype, options):
    # D = 80 and V = 333 end in partial blocks, tiles and slices everywhere.
    leaves, targets = random_head((2, 19), 80, 333, dtype, bias=bool(options))
    lp, ent, grads = check_against_reference(leaves, targets, **options)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == targets.shape
    assert [g.dtype for g in grads] == [dtype] * len(grads)
    ignored = targets == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (grads[0][ignored] == 0).all(), "ignored rows must receive exactly zero gradient"


def test_default_tiles_odd_vocabulary(backend):
    """The shipped tile sizes on V = 4097 (one past a power of two) and D = 80."""
    leaves, targets = random_head((37,), 80, 4097, torch.float32, bias=True)
    check_against_reference(leaves, targets)


def test_logprobs_only_and_entropy_only_gradients(backend, small_tiles):
    (hidden, weight), targets = random_head((23,), 48, 301, torch.float32)
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    for output in (0, 1):
        ours = fa.linear_logprobs(hidden, weight, targets, return_entropy=True)[output]
        theirs = linear_logprobs_reference(*exact, targets, return_entropy=True)[output]
        for actual, expected in zip(torch.autograd.grad(ours.sum(), (hidden, weight)),
                                    torch.autograd.grad(theirs.sum(), exact)):
            assert_close(actual, expected, TOLERANCE[torch.float32], f"output {output}")
    lp = fa.linear_logprobs(hidden, weight, targets)  # without return_entropy
    grad = torch.autograd.grad(lp.sum(), hidden)[0]
    expected = torch.autograd.grad(linear_logprobs_reference(*exact, targets).sum(), exact[0])[0]
    assert_close(grad, expected, TOLERANCE[torch.float32], "logprobs alone")


def test_frozen_head_skips_the_weight_gradient(backend, small_tiles, monkeypatch):
    (hidden, weight), targets = random_head((2, 9), 40, 300, torch.float32)
    weight.requires_grad_(False)
    asked = []
    original = _linear_backward.linear_backward

    def spy(*args, **kwargs):
        asked.append(kwargs["need_weight"])
        return original(*args, **kwargs)

    monkeypatch.setattr(_linear_backward, "linear_backward", spy)
    _, _, (grad_hidden,) = check_against_reference([hidden, weight], targets)
    assert asked == [False], "the weight gradient was computed for a frozen head"
    assert grad_hidden.shape == hidden.shape


def test_all_ignored_and_no_rows(backend):
    (hidden, weight, bias), targets = random_head((3, 4), 16, 50, torch.float32, bias=True)
    lp, ent = fa.linear_logprobs(hidden, weight, torch.full_like(targets, -100), bias=bias,
                                 return_entropy=True)
    assert (lp == 0).all() and (ent == 0).all()
    grads = torch.autograd.grad((lp + ent).sum(), (hidden, weight, bias))
    assert all((g == 0).all() for g in grads)
    empty = hidden[:0].detach().requires_grad_()
    lp = fa.linear_logprobs(empty, weight, targets[:0])
    assert lp.shape == (0, 4)
    grad_hidden, grad_weight = torch.autograd.grad(lp.sum(), (empty, weight))
    assert grad_hidden.shape == empty.shape and (grad_weight == 0).all()


def test_extreme_logits(backend, small_tiles):
    """Logits near 1000 (no overflow) and a vocabulary masked with -inf bias (no NaN)."""
    (hidden, weight, bias), targets = random_head((17,), 32, 290, torch.float32, bias=True)
    with torch.no_grad():
        bias.add_(1000.0)
        bias[::3] = float("-inf")
    targets = torch.where(targets % 3 == 0, targets + 1, targets).clamp(max=289)
    lp, ent, grads = check_against_reference([hidden, weight, bias], targets)
    assert torch.isfinite(lp).all() and all(torch.isfinite(g).all() for g in grads)


def test_inputs_are_not_modified(backend, small_tiles):
    leaves, targets = random_head((13,), 24, 270, torch.float32, bias=True)
    before = [x.detach().clone() for x in leaves]
    lp, ent = fa.linear_logprobs(*leaves[:2], targets, bias=leaves[2], return_entropy=True,
                                 softcap=3.0)
    torch.autograd.grad((lp + ent).sum(), leaves)
    assert all(torch.equal(x, y) for x, y in zip(leaves, before))


def test_matches_trl_chunked_logprob_function(backend):
    """Equal to TRL's ChunkedLogProbFunction (the peer) on the same inputs, values and grads."""
    chunked = pytest.importorskip("trl.kernels.chunked_logprob").ChunkedLogProbFunction
    (hidden, weight, bias), targets = random_head((41,), 64, 1000, torch.float32, bias=True,
                                                  ignore_share=0.0)
    upstream = [torch.randn(41, device=DEVICE) for _ in range(2)]
    lp, ent, grads = forward_backward(fa.linear_logprobs, [hidden, weight, bias], targets,
                                      upstream, temperature=0.8, softcap=5.0)
    trl_lp, trl_ent, *_ = chunked.apply(hidden, weight, bias, targets, 0.8, 256, 5.0, 1.0,
                                        ("entropy",))
    trl_grads = torch.autograd.grad((trl_lp * upstream[0]).sum() + (trl_ent * upstream[1]).sum(),
                                    (hidden, weight, bias))
    for name, ours, theirs in zip(["logprobs", "entropy", "hidden", "weight", "bias"],
                                  [lp, ent, *grads], [trl_lp, trl_ent, *trl_grads]):
        assert_close(ours, theirs, 1e-5, name)


def test_unused_entropy_costs_no_entropy_gradient(backend, monkeypatch):
    """return_entropy=True with only the log-probs in the loss (entropy kept for logging): the
    backward gets no zero-filled entropy gradient to differentiate."""
    import importlib
    module = importlib.import_module({"triton": "fastalign.kernels.linear_logprobs",
                                      "native": "fastalign.ops.linear_logprobs_native",
                                      "torch": "fastalign.ops.linear_logprobs_torch"}[backend])
    original, seen = module.linear_logprobs_grad_tile, []

    def spy(*args, **kwargs):
        seen.append(args[7] is None)  # grad_entropy
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "linear_logprobs_grad_tile", spy)
    (hidden, weight), targets = random_head((9,), 16, 100, torch.float32)
    lp, _ = fa.linear_logprobs(hidden, weight, targets, return_entropy=True)
    lp.sum().backward()
    assert seen and all(seen)


@pytest.mark.parametrize("hidden_dtype,weight_dtype", [(torch.bfloat16, torch.float32),
                                                       (torch.float32, torch.float16)])
def test_weight_of_another_dtype(backend, small_tiles, hidden_dtype, weight_dtype):
    """Autocast's case: bf16 activations, fp32 master weights (and the reverse). The matmuls
    run in hidden's dtype, weight slices cast as used; each gradient comes in its input's
    dtype and is as close to float64 as torch's own composition in that dtype."""
    (hidden, weight, bias), targets = random_head((3, 11), 48, 300, hidden_dtype, bias=True)
    weight = weight.detach().to(weight_dtype).requires_grad_()
    bias = bias.detach().to(weight_dtype).requires_grad_()
    upstream = [torch.randn(targets.shape, device=DEVICE) for _ in range(2)]
    lp, ent, grads = forward_backward(fa.linear_logprobs, [hidden, weight, bias], targets,
                                      upstream)
    assert [g.dtype for g in grads] == [hidden_dtype, weight_dtype, weight_dtype]
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    ref = forward_backward(linear_logprobs_reference, exact, targets, upstream)

    def torch_own(h, w, t, *, bias, **options):  # what F.linear under autocast computes
        return linear_logprobs_reference(h, w.to(h.dtype), t, bias=bias.to(h.dtype),
                                         compute_dtype=torch.float32, **options)

    own = forward_backward(torch_own, [hidden, weight, bias], targets, upstream)
    for name, ours, expected, theirs in zip(["logprobs", "entropy", "hidden", "weight", "bias"],
                                            [lp, ent, *grads], [ref[0], ref[1], *ref[2]],
                                            [own[0], own[1], *own[2]]):
        torch_error = relative_error(theirs, expected)
        assert_close(ours, expected, tolerance_for(min(hidden_dtype, weight_dtype,
                                                       key=lambda d: d.itemsize), torch_error), name)


def test_strided_hidden_and_weight(backend, small_tiles):
    """The [:, :-1] slice of [B, T, D] hidden states and a weight stored transposed ([D, V]
    storage viewed as [V, D]) give the results of their contiguous copies."""
    gen = torch.Generator().manual_seed(3)
    full_hidden = torch.randn(2, 8, 40, generator=gen).to(DEVICE).requires_grad_()
    weight_storage = (torch.randn(40, 270, generator=gen) * 0.3).to(DEVICE).requires_grad_()
    targets = torch.randint(0, 270, (2, 7), generator=gen).to(DEVICE)
    lp = fa.linear_logprobs(full_hidden[:, :-1], weight_storage.t(), targets)
    grads = torch.autograd.grad(lp.sum(), (full_hidden, weight_storage))
    exact = [x.detach().double().requires_grad_() for x in (full_hidden, weight_storage)]
    expected = linear_logprobs_reference(exact[0][:, :-1], exact[1].t(), targets)
    expected_grads = torch.autograd.grad(expected.sum(), exact)
    assert_close(lp, expected, TOLERANCE[torch.float32], "logprobs")
    for name, actual, wanted in zip(["hidden", "weight"], grads, expected_grads):
        assert_close(actual, wanted, TOLERANCE[torch.float32], name)
    assert (grads[0][:, -1] == 0).all()


@pytest.mark.parametrize("element_size,budget,expected", [
    (2, 219 * 1024, (128, 256, 64, 8, 3)),  # bf16 on an H100: the tuned tiles, unchanged
    (4, 219 * 1024, (128, 256, 64, 8, 2)),  # fp32 on an H100: one stage fewer
    (2, 91 * 1024, (128, 128, 64, 8, 2)),   # bf16 on a 99 KiB GPU: narrower vocabulary tiles
    (4, 40 * 1024, (32, 64, 64, 8, 2)),     # a tiny budget stops at 32 x 64 (not below)
])
def test_tiles_fit_shared_memory(element_size, budget, expected):
    """The Triton launchers shrink the tuned tiles to the GPU's shared memory, never below a
    workable size."""
    from fastalign.kernels.linear_logprobs import _fit_shared_memory
    tiles = _fit_shared_memory(128, 256, 64, 8, 3, element_size, budget)
    assert tiles == expected
    block_n, block_v, block_d, _, stages = tiles
    fits = stages * (block_n + block_v) * block_d * element_size <= budget
    assert fits or (block_n, block_v) == (32, 64)
