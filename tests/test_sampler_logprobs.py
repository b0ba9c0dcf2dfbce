"""Sampler-aware log-probs (top_k, min_p, per-row temperature) of token_logprobs and
linear_logprobs on every backend, against a float64 reference that runs Hugging Face's own
TopKLogitsWarper / MinPLogitsWarper on the full logits; and the on-policy check: tokens sampled
with those warpers score a log-ratio of 0 against the warped distribution."""

import math
import shutil

import pytest
import torch
from conftest import DEVICE, TOLERANCE, assert_close
from helpers import slow_beyond, warped_entropy, warped_log_softmax

import fastalign as fa
from fastalign.ops._backends import linear_logprobs_launchers

DTYPES = slow_beyond([torch.float32, torch.bfloat16], [torch.float32])
# Each case one kernel path or a mix of them; "rows" stands for a per-row temperature tensor.
CASES = {
    "top_k": dict(top_k=40),
    "min_p": dict(min_p=0.05),
    "both": dict(top_k=25, min_p=0.1, temperature=0.7),
    "softcap": dict(top_k=10, min_p=0.02, softcap=4.0, temperature=1.3),
    "row_temperature": dict(top_k=30, min_p=0.1, temperature="rows"),
    "k_of_one": dict(top_k=1),
    "min_p_one": dict(min_p=1.0, temperature=0.5),
}
# The fast tier: one case per op with every flag of its kernels (top-k, min-p; the per-row
# temperature of token_logprobs' kernels runs in test_row_temperature_equals_float_temperature).
TOKEN_CASES = slow_beyond(list(CASES), ["both"])
LINEAR_CASES = slow_beyond(list(CASES), ["row_temperature"])
VOCAB = 1000 + 7  # a multiple of no block
# Inductor on CPU generates C++; without a compiler it cannot run at all.
COMPILERS = ["aot_eager"] + (["inductor"] if DEVICE.type == "cuda" or shutil.which("g++")
                             or shutil.which("clang++") else [])


def reference(z, targets, ignore_index=-100, **options):
    """(log-probs, entropy of the renormalized distribution) in float64; ignored rows 0."""
    log_p = warped_log_softmax(z, **options)
    ignored = targets == ignore_index
    logprobs = log_p.gather(-1, targets.masked_fill(ignored, 0)[..., None]).squeeze(-1)
    entropy = warped_entropy(log_p)
    return logprobs.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)


def options_of(case, leading_shape, flat=False):
    """The case's options, a per-row temperature drawn in (0.5, 1.5) for "rows"."""
    options = dict(CASES[case])
    if options.get("temperature") == "rows":
        gen = torch.Generator().manual_seed(3)
        temperature = 0.5 + torch.rand(leading_shape, generator=gen)
        options["temperature"] = (temperature.reshape(-1) if flat else temperature).to(DEVICE)
    return options


def upstream_for(logprobs, seed):
    """Random upstream gradients, 0 where the reference log-prob is -inf (outside the support)."""
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(logprobs.shape, generator=gen).to(DEVICE)
    return grad.masked_fill(logprobs == float("-inf"), 0.0)


def compare(actual, expected, tolerance, what):
    """Equal -inf positions, then the finite values within ``tolerance``."""
    outside = expected == float("-inf")
    assert torch.equal(actual == float("-inf"), outside.to(actual.device)), \
        f"{what}: the support differs from Hugging Face's warpers'"
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    assert_close(actual.masked_fill(outside, 0.0), expected.masked_fill(outside, 0.0),
                 tolerance, what)


def token_case(shape, dtype, *, seed=0, ignore_share=0.15):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, VOCAB, generator=gen) * 3.0).to(DEVICE, dtype)
    # Half the targets are the row's argmax (inside every support), half uniform (mostly not).
    targets = torch.where(torch.rand(shape, generator=gen) < 0.5,
                          logits.float().cpu().argmax(-1), torch.randint(0, VOCAB, shape,
                                                                         generator=gen)).to(DEVICE)
    ignored = (torch.rand(shape, generator=gen) < ignore_share).to(DEVICE)
    ignored.view(-1)[0] = False
    return logits, targets.masked_fill(ignored, -100)


@pytest.mark.parametrize("case", TOKEN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_match_hf_warpers(backend, small_tiles, case, dtype):
    logits, targets = token_case((3, 7), dtype)
    options = options_of(case, targets.shape)
    leaf = logits.detach().clone().requires_grad_()
    logprobs, entropy = fa.token_logprobs(leaf * 1, targets, return_entropy=True, **options)
    exact_leaf = logits.detach().double().requires_grad_()
    ref_lp, ref_ent = reference(exact_leaf, targets, **options)
    compare(logprobs, ref_lp, TOLERANCE[dtype], "logprobs")
    assert_close(entropy, ref_ent, TOLERANCE[dtype], "entropy")
    assert (ref_lp == float("-inf")).any() or case in ("k_of_one", "min_p_one")
    g_lp, g_ent = upstream_for(ref_lp, 1), upstream_for(ref_ent, 2)
    (grad,) = torch.autograd.grad((logprobs.masked_fill(g_lp == 0, 0.0) * g_lp).sum()
                                  + (entropy * g_ent).sum(), leaf)
    (ref_grad,) = torch.autograd.grad((ref_lp.masked_fill(g_lp == 0, 0.0) * g_lp).sum()
                                      + (ref_ent * g_ent).sum(), exact_leaf)
    assert grad.dtype == dtype
    assert_close(grad, ref_grad, TOLERANCE[dtype], "grad")
    ignored = targets == -100
    assert (logprobs[ignored] == 0).all() and (grad[ignored] == 0).all()


def backend_logits(hidden, weight, bias):
    """The logits as the selected backend forms them (float32), so the reference's support is
    the one the backend sees: a bf16 matmul rounds (and ties) logits that float64 keeps apart."""
    from fastalign._backend import select_backend
    launchers = linear_logprobs_launchers(select_backend(hidden.device))
    flat = hidden.detach().reshape(-1, hidden.shape[-1]).contiguous()
    return launchers.logits_tile(flat, weight.detach().contiguous(),
                                 None if bias is None else bias.detach().contiguous(),
                                 0, weight.shape[0]).reshape(*hidden.shape[:-1], -1)


def linear_case(shape, dim, dtype, *, seed=0, duplicate_rows=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, dim, generator=gen)
    weight = torch.randn(VOCAB, dim, generator=gen) * (3.0 / dim ** 0.5)
    if duplicate_rows:  # equal logits in several columns: ties at any rank
        weight[1::3] = weight[0:-1:3][:weight[1::3].shape[0]]
    bias = torch.randn(VOCAB, generator=gen) * 0.5
    targets = torch.randint(0, VOCAB, shape, generator=gen)
    targets.view(-1)[::2] = (hidden @ weight.T + bias).argmax(-1).view(-1)[::2]
    ignored = torch.rand(shape, generator=gen) < 0.15
    ignored.view(-1)[0] = False
    leaves = [x.to(DEVICE, dtype).requires_grad_() for x in (hidden, weight, bias)]
    return leaves, targets.masked_fill(ignored, -100).to(DEVICE)


@pytest.mark.parametrize("case", LINEAR_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_logprobs_match_hf_warpers(backend, small_tiles, case, dtype):
    (hidden, weight, bias), targets = linear_case((2, 9), 40, dtype)
    options = options_of(case, targets.shape, flat=True)
    logprobs, entropy = fa.linear_logprobs(hidden, weight, targets, bias=bias,
                                           return_entropy=True, **options)
    # The backend's own logits as values, the float64 matmul's as the path of the gradient.
    exact = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    product = exact[0] @ exact[1].T + exact[2]
    z = product + (backend_logits(hidden, weight, bias).double() - product).detach()
    ref_lp, ref_ent = reference(z, targets, **options)
    compare(logprobs, ref_lp, TOLERANCE[dtype], "logprobs")
    assert_close(entropy, ref_ent, TOLERANCE[dtype], "entropy")
    g_lp, g_ent = upstream_for(ref_lp, 1), upstream_for(ref_ent, 2)
    loss = (logprobs.masked_fill(g_lp == 0, 0.0) * g_lp).sum() + (entropy * g_ent).sum()
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    ref_loss = (ref_lp.masked_fill(g_lp == 0, 0.0) * g_lp).sum() + (ref_ent * g_ent).sum()
    ref_grads = torch.autograd.grad(ref_loss, exact)
    for name, grad, expected in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert grad.dtype == dtype
        # bf16: the gradient tile is rounded before two bf16 matmuls (as without a sampler).
        assert_close(grad, expected, TOLERANCE[dtype] * (2 if dtype != torch.float32 else 1),
                     f"grad {name}")
    assert (logprobs[targets == -100] == 0).all()


@pytest.mark.parametrize("op", ["token", "linear"])
def test_ties_at_the_kth_value_are_kept(backend, small_tiles, op):
    """HF keeps every token equal to the k-th largest; so do we (top_k=5 keeps 7 here)."""
    if op == "token":
        logits, targets = token_case((4, 3), torch.float32, ignore_share=0.0)
        top = logits.topk(7, dim=-1)
        # The 4th to 7th largest become equal to the 5th: a tie across the k-th rank.
        logits.scatter_(-1, top.indices[..., 3:7], top.values[..., 4:5].expand(-1, -1, 4))
        logits.scatter_(-1, top.indices[..., 3:4], top.values[..., 3:4])
        targets = top.indices[..., 6]  # tied with the k-th: inside the support
        logprobs = fa.token_logprobs(logits, targets, top_k=5)
        ref_lp, _ = reference(logits, targets, top_k=5)
    else:
        (hidden, weight, bias), targets = linear_case((3, 5), 24, torch.float32,
                                                      duplicate_rows=True)
        logprobs = fa.linear_logprobs(hidden, weight, targets, bias=None, top_k=6)
        ref_lp, _ = reference(backend_logits(hidden, weight, None), targets, top_k=6)
    kept = (warped_log_softmax(logits if op == "token" else backend_logits(hidden, weight, None),
                               top_k=5 if op == "token" else 6) > float("-inf")).sum(-1)
    assert (kept > (5 if op == "token" else 6)).any(), "the case has no tie at the k-th value"
    compare(logprobs, ref_lp, 1e-5, "logprobs")


@pytest.mark.parametrize("op", ["token", "linear"])
def test_outside_the_support_is_minus_inf_without_gradient(backend, op):
    """A target the sampler could not have drawn: -inf, and a gradient of exactly 0 from it even
    with a nonzero upstream gradient (no NaN anywhere); other rows are unaffected."""
    if op == "token":
        logits, _ = token_case((5,), torch.float32, ignore_share=0.0)
        leaf = logits.clone().requires_grad_()
        targets = logits.argsort(-1)[:, 0]  # the least likely token: outside top-3
        targets[0] = logits[0].argmax()
        logprobs = fa.token_logprobs(leaf, targets, top_k=3, min_p=0.2)
        inputs = (leaf,)
    else:
        (hidden, weight, bias), _ = linear_case((5,), 16, torch.float32)
        targets = (hidden @ weight.T).argsort(-1)[:, 0].detach()
        targets[0] = (hidden[0] @ weight.T).argmax()
        logprobs = fa.linear_logprobs(hidden, weight, targets, bias=bias, top_k=3, min_p=0.2)
        inputs = (hidden, weight, bias)
    assert torch.isfinite(logprobs[0]) and (logprobs[1:] == float("-inf")).all()
    grads = torch.autograd.grad(logprobs, inputs, grad_outputs=torch.ones_like(logprobs))
    assert all(torch.isfinite(g).all() for g in grads)
    if op == "token":
        assert (grads[0][1:] == 0).all() and (grads[0][0] != 0).any()
    else:
        assert (grads[0][1:] == 0).all()


def test_row_temperature_equals_float_temperature(backend, small_tiles):
    """A per-row tensor holding one temperature gives what that float gives, bit for bit, as
    [...] or as [N]; and rows with different temperatures each get their own."""
    logits, targets = token_case((2, 3), torch.float32)
    expected = fa.token_logprobs(logits, targets, temperature=0.7, min_p=0.1)
    for shape in ((2, 3), (6,)):
        rows = torch.full(shape, 0.7, device=DEVICE)
        assert torch.equal(fa.token_logprobs(logits, targets, temperature=rows, min_p=0.1),
                           expected)
    (hidden, weight, bias), targets = linear_case((2, 3), 16, torch.float32)
    expected = fa.linear_logprobs(hidden, weight, targets, bias=bias, temperature=1.3)
    mixed = torch.tensor([[1.3, 0.5, 1.3], [2.0, 1.3, 1.3]], device=DEVICE)
    got = fa.linear_logprobs(hidden, weight, targets, bias=bias, temperature=mixed)
    same = mixed == 1.3
    assert torch.equal(got[same], expected[same])
    ref_lp, _ = reference(backend_logits(hidden, weight, bias), targets, temperature=mixed)
    compare(got, ref_lp, 1e-5, "per-row temperature")


def test_sliced_logits_and_inplace_backward(backend):
    """The [:, :-1] slice read in place gives what a contiguous copy gives, and the in-place
    backward writes the gradient the fresh one gets."""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 6, VOCAB, generator=gen) * 3.0).to(DEVICE)
    targets = logits[:, :-1].argsort(-1, descending=True)[..., 3]  # the 4th most likely
    targets[0, ::2] = -100
    options = dict(top_k=5, min_p=0.01, temperature=torch.rand(2, 5, generator=gen).to(DEVICE)
                   + 0.5)
    grads = []
    for sliced, inplace in ((False, False), (True, False), (True, True)):
        leaf = logits.clone().requires_grad_()
        rows = leaf * 1
        rows = rows[:, :-1] if sliced else rows[:, :-1].contiguous()
        logprobs = fa.token_logprobs(rows, targets, inplace_backward=inplace, **options)
        assert torch.isfinite(logprobs).all()
        grads.append(torch.autograd.grad(logprobs.sum(), leaf)[0])
        if len(grads) > 1:
            assert torch.equal(logprobs, first)
        else:
            first = logprobs
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])
    assert (grads[0][:, -1] == 0).all() and (grads[0][0, ::2] == 0).all()


def test_no_filter_when_k_covers_the_vocabulary(backend):
    """top_k >= V (HF clamps it to V) and min_p=None filter nothing; top_p=1.0 is no filter."""
    logits, targets = token_case((4,), torch.float32)
    plain = fa.token_logprobs(logits, targets, temperature=0.8)
    for options in (dict(top_k=VOCAB), dict(top_k=10 * VOCAB), dict(top_p=1.0)):
        assert torch.equal(fa.token_logprobs(logits, targets, temperature=0.8, **options), plain)


@pytest.mark.parametrize("op", ["token", "linear"])
@pytest.mark.parametrize("options", slow_beyond(
    [dict(top_k=20), dict(min_p=0.05, temperature=0.8), dict(top_k=50, min_p=0.02)],
    [dict(top_k=50, min_p=0.02)]), ids=str)
def test_sampled_tokens_score_ratio_one(backend, op, options):
    """On policy, the trainer's log-prob of a token the sampler drew equals the sampler's: draw
    with HF's warpers (torch.multinomial on the warped softmax), score with the op and the same
    options on the same logits: every token is inside the support and the log-ratio is 0 to
    float32 precision."""
    gen = torch.Generator().manual_seed(7)
    if op == "token":
        logits = (torch.randn(6, 8, VOCAB, generator=gen) * 2.5).to(DEVICE)
        scores = logits
    else:
        hidden = torch.randn(48, 32, generator=gen).to(DEVICE)
        weight = (torch.randn(VOCAB, 32, generator=gen) * 0.5).to(DEVICE)
        scores = backend_logits(hidden, weight, None)
    log_p = warped_log_softmax(scores, **options)
    sampled = torch.multinomial(log_p.exp().reshape(-1, VOCAB).float().cpu(), 1,
                                generator=gen).reshape(scores.shape[:-1]).to(DEVICE)
    if op == "token":
        ours = fa.token_logprobs(logits, sampled, **options)
    else:
        ours = fa.linear_logprobs(hidden, weight, sampled, **options)
    sampler = log_p.gather(-1, sampled[..., None]).squeeze(-1)
    assert torch.isfinite(ours).all(), "a sampled token scored outside the support"
    assert (ours.double() - sampler).abs().max() <= 2e-5


@pytest.mark.slow
@pytest.mark.parametrize("compiler", COMPILERS)
def test_compiles_without_graph_breaks(compiler, tmp_path, monkeypatch):
    """Both ops with top_k, min_p and a per-row temperature under torch.compile(fullgraph)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    logits, targets = token_case((2, 5), torch.float32)
    (hidden, weight, bias), _ = linear_case((2, 5), 16, torch.float32)
    temperature = torch.linspace(0.6, 1.4, 10, device=DEVICE).reshape(2, 5)

    def loss(logits, hidden, weight):
        lp, ent = fa.token_logprobs(logits, targets, top_k=20, min_p=0.05, return_entropy=True,
                                    temperature=temperature)
        linear = fa.linear_logprobs(hidden, weight, targets, top_k=30, temperature=temperature)
        finite = lambda x: x.masked_fill(x == float("-inf"), 0.0)  # noqa: E731
        return (finite(lp) + 0.1 * ent + finite(linear)).square().mean()

    leaves = (logits.requires_grad_(), hidden, weight)
    eager = loss(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(loss, fullgraph=True, backend=compiler)(*leaves)
    torch.testing.assert_close(compiled, eager)
    for grad, expected in zip(torch.autograd.grad(compiled, leaves), eager_grads):
        torch.testing.assert_close(grad, expected)
    assert math.isfinite(compiled.item())
