"""The native C++ CPU backend: it builds where a compiler exists, agrees with the float64
reference and with the Triton and torch backends on the same inputs, gives the same bits on 1
and 2 threads, checks its arguments, and falls back to torch (with one warning) when it cannot
be built. The backend-parametrized suites (test_token_logprobs, test_kl, test_linear_logprobs,
...) run every case on it as well."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICE, assert_close, tolerance_for

import fastalign as fa
from fastalign import _native
from fastalign._layout import RowLayout
from fastalign.kernels.divergence_interface import divergence_spec
from fastalign.reference import token_kl_reference, token_logprobs_reference

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the native kernels run on CPU tensors")

HAVE_COMPILER = any(shutil.which(name) for name in ("c++", "g++"))
needs_native = pytest.mark.skipif("native" not in fa.available_backends("cpu"),
                                  reason="the native extension is not built here")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 2 blocks of 2048 columns and a tail of 907 (not a whole vector), then one partial block.
VOCABS = [5003, 13]


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler on this machine")
def test_native_builds_where_a_compiler_exists():
    assert "native" in fa.available_backends("cpu"), _native.unavailable_reason()


def _with_backend(monkeypatch, name, fn):
    monkeypatch.setenv("FASTALIGN_BACKEND", name)
    return fn()


def _strided_case(vocab, dtype, seed=0):
    """The [:, :-1] slice of [B, T, V] logits (rows not evenly spaced), with -inf columns and
    ignored positions."""
    gen = torch.Generator().manual_seed(seed)
    full = (torch.randn(3, 8, vocab, generator=gen) * 4).to(dtype)
    full[..., 1::11] = float("-inf")
    targets = torch.randint(0, vocab, (3, 7), generator=gen)
    targets[0, 2] = targets[2, 6] = -100
    targets[1, 1] = 1  # a -inf target column where V > 1 (1 % 11 == 1)
    return full[:, :-1], targets


def _token_logprobs_with_grads(logits, targets, **options):
    leaf = logits.detach().clone().requires_grad_()
    logprobs, entropy = fa.token_logprobs(leaf * 1, targets, return_entropy=True, **options)
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(2, *targets.shape, generator=gen)
    ((logprobs * weights[0]).sum() + (entropy * weights[1]).sum()).backward()
    return logprobs, entropy, leaf.grad


@needs_native
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [dict(), dict(temperature=0.8, softcap=6.0)],
                         ids=["plain", "softcap"])
def test_token_logprobs_agrees_with_every_backend_and_the_reference(monkeypatch, vocab, dtype,
                                                                    options):
    logits, targets = _strided_case(vocab, dtype)
    results = {name: _with_backend(monkeypatch, name,
                                   lambda: _token_logprobs_with_grads(logits, targets, **options))
               for name in fa.available_backends("cpu")}
    assert {"native", "torch"} <= set(results)
    # -inf target columns give -inf log-probs: compare where finite, and require the same infs.
    reference = token_logprobs_reference(logits.double(), targets, return_entropy=True, **options)
    native = results["native"]
    finite = torch.isfinite(reference[0])
    assert torch.equal(torch.isfinite(native[0]), finite)
    for name, result in results.items():
        logprobs, entropy, grad = result
        tol = tolerance_for(dtype)
        assert_close(logprobs[finite], reference[0][finite], tol, f"{name} logprobs")
        assert_close(entropy, reference[1], tol, f"{name} entropy")
        if name != "native":
            assert_close(native[2].float(), grad.float(), 2 * tol, f"native vs {name} gradient")
    ignored = targets == -100
    assert (native[0][ignored] == 0).all() and (native[2][ignored] == 0).all()


@needs_native
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_kl_agrees_with_every_backend_and_the_reference(monkeypatch, vocab, dtype):
    gen = torch.Generator().manual_seed(2)
    full = (torch.randn(2, 6, vocab, generator=gen) * 3 + 50).to(dtype)  # a large common offset
    ref = (full.float() + torch.randn(2, 6, vocab, generator=gen)).to(dtype)
    mask = torch.rand(2, 5, generator=gen) > 0.3
    logits, ref_logits = full[:, 1:], ref[:, :-1]

    def run():
        leaf = logits.detach().clone().requires_grad_()
        kl = fa.token_kl(leaf * 1, ref_logits, temperature=0.9, mask=mask)
        (kl * torch.arange(1.0, 11.0).view(2, 5)).sum().backward()
        return kl, leaf.grad

    results = {name: _with_backend(monkeypatch, name, run) for name in fa.available_backends("cpu")}
    leaf = logits.detach().double().requires_grad_()
    expected = token_kl_reference(leaf, ref_logits.double(), temperature=0.9) * mask
    (expected * torch.arange(1.0, 11.0, dtype=torch.float64).view(2, 5)).sum().backward()
    for name, (kl, grad) in results.items():
        # KL of near-identical rows is tiny: compare against the logits' scale, per the contract.
        assert_close(kl, expected, tolerance_for(dtype), f"{name} kl")
        assert_close(grad.float(), leaf.grad, 2 * tolerance_for(dtype), f"{name} gradient")
    assert (results["native"][0][~mask] == 0).all()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_that_climb_or_fall_along_the_row(monkeypatch, dtype):
    """The forward takes a block's exps relative to the running max in one pass and redoes the
    block only when its max lies more than 60 above it: rows whose blocks climb by 40 (one pass,
    the max raised), by 100 (redone), fall, start with -inf blocks, or end in a spike."""
    monkeypatch.setenv("FASTALIGN_BACKEND", "native")
    vocab = 4 * 2048 + 37
    block = torch.arange(vocab) // 2048
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, vocab, generator=gen) * 2
    logits[0] += 40.0 * block
    logits[1] += 100.0 * block
    logits[2] -= 30.0 * block
    logits[3, : 2 * 2048] = float("-inf")
    logits[4, -1] = 500.0
    logits[5] += 61.0 * (torch.arange(vocab) >= vocab - 5)  # the tail's last vector only
    logits = logits.to(dtype)
    targets = torch.tensor([vocab - 1, 5000, 7, 2 * 2048 + 3, 100, vocab - 2])
    logprobs, entropy, grad = _token_logprobs_with_grads(logits, targets)
    leaf = logits.double().requires_grad_()
    ref_logprobs, ref_entropy = token_logprobs_reference(leaf, targets, return_entropy=True)
    weights = torch.randn(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ((ref_logprobs * weights[0]).sum() + (ref_entropy * weights[1]).sum()).backward()
    tol = tolerance_for(dtype)
    assert_close(logprobs, ref_logprobs, tol, "logprobs")
    assert_close(entropy, ref_entropy, tol, "entropy")
    assert_close(grad.double(), leaf.grad, tol, "gradient")
    assert (grad[3, : 2 * 2048] == 0).all()  # p = 0 columns get exactly 0


# 64 x 131072 fp32 = 32 MiB: the smallest gradient that comes from the native gradient buffers.
BIG_ROWS, BIG_VOCAB = 64, 131072


def _big_case(dtype=torch.float32):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(BIG_ROWS, BIG_VOCAB, generator=gen).to(dtype)
    targets = torch.randint(0, BIG_VOCAB, (BIG_ROWS,), generator=gen)
    targets[3] = -100  # an ignored row: written as zeros, not skipped
    return logits, targets


def _logprobs_gradient(logits, targets):
    leaf = logits.detach().clone().requires_grad_()
    fa.token_logprobs(leaf, targets).sum().backward()
    return leaf.grad


@needs_native
def test_a_freed_gradient_buffer_is_reused_and_fully_overwritten(monkeypatch):
    """The latest freed large gradient's memory is handed to the next one: poisoned with NaN
    after use, it must come back holding exactly the new gradient, ignored rows included."""
    monkeypatch.setenv("FASTALIGN_BACKEND", "native")
    monkeypatch.delenv(_native.GRAD_CACHE_ENV, raising=False)
    fa.empty_cache()
    logits, targets = _big_case()
    expected = _logprobs_gradient(logits, targets).clone()
    first = _logprobs_gradient(logits, targets)
    address = first.data_ptr()
    first.fill_(float("nan"))
    del first
    assert _native.extension().kept_gradient_bytes() >= BIG_ROWS * BIG_VOCAB * 4
    second = _logprobs_gradient(logits, targets)
    assert second.data_ptr() == address
    assert torch.equal(second, expected) and (second[3] == 0).all()
    # token_kl's backward takes the same buffer.
    second.fill_(float("nan"))
    del second
    ref_logits = logits + 0.3
    kl_grads = []
    for _ in range(2):
        leaf = logits.detach().clone().requires_grad_()
        fa.token_kl(leaf, ref_logits).sum().backward()
        kl_grads.append(leaf.grad.clone())
        assert leaf.grad.data_ptr() == address
        leaf.grad.fill_(float("nan"))
        del leaf
    assert torch.isfinite(kl_grads[0]).all() and torch.equal(kl_grads[0], kl_grads[1])
    assert fa.empty_cache() >= BIG_ROWS * BIG_VOCAB * 4
    assert fa.empty_cache() == 0 and _native.extension().kept_gradient_bytes() == 0


@needs_native
def test_gradient_reuse_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "native")
    monkeypatch.setenv(_native.GRAD_CACHE_ENV, "0")
    fa.empty_cache()
    logits, targets = _big_case(torch.bfloat16)
    grad = _logprobs_gradient(logits, targets)
    reference = _logprobs_gradient(logits.float(), targets)
    assert_close(grad.float(), reference, tolerance_for(torch.bfloat16), "bf16 gradient")
    del grad
    assert _native.extension().kept_gradient_bytes() == 0


@needs_native
def test_small_gradients_and_other_buffers_are_not_kept():
    ext = _native.extension()
    fa.empty_cache()
    small = ext.empty_gradient([4, 1000], torch.float32, True)
    assert small.shape == (4, 1000) and small.is_contiguous()
    del small
    assert ext.kept_gradient_bytes() == 0
    big = ext.empty_gradient([5 * BIG_ROWS, BIG_VOCAB], torch.float16, True)  # 80 MiB
    assert big.dtype == torch.float16 and big.shape == (5 * BIG_ROWS, BIG_VOCAB)
    address = big.data_ptr()
    del big
    assert ext.kept_gradient_bytes() == 5 * BIG_ROWS * BIG_VOCAB * 2
    # Under half the kept block's size: a fresh block; freed, it replaces the kept one.
    other = ext.empty_gradient([BIG_ROWS, BIG_VOCAB], torch.float32, True)  # 32 MiB
    assert other.data_ptr() != address
    del other
    assert ext.kept_gradient_bytes() == BIG_ROWS * BIG_VOCAB * 4
    assert fa.empty_cache() > 0


@needs_native
def test_one_and_two_threads_give_the_same_bits(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "native")
    logits, targets = _strided_case(5003, torch.float32)
    ref_logits = logits + 0.5 * torch.randn(logits.shape)
    before = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaf = logits.detach().clone().requires_grad_()
            kl = fa.token_kl(leaf, ref_logits)
            kl.sum().backward()
            outputs.append((*_token_logprobs_with_grads(logits, targets, softcap=5.0), kl, leaf.grad))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*outputs):
        assert torch.equal(one, two)


@needs_native
def test_nan_logits_poison_only_their_row(monkeypatch):
    monkeypatch.setenv("FASTALIGN_BACKEND", "native")
    logits = torch.randn(4, 3000)
    logits[1, 2500] = float("nan")
    logprobs = fa.token_logprobs(logits, torch.tensor([0, 1, 2, 3]))
    assert logprobs[1].isnan() and torch.isfinite(logprobs[[0, 2, 3]]).all()
    kl = fa.token_kl(logits, torch.randn(4, 3000))
    assert kl[1].isnan() and torch.isfinite(kl[[0, 2, 3]]).all()
    # bf16 gradients are rounded in registers: NaN must stay NaN, the other rows finite.
    leaf = logits.bfloat16().requires_grad_()
    fa.token_logprobs(leaf, torch.tensor([0, 1, 2, 3])).sum().backward()
    assert leaf.grad[1].isnan().all() and torch.isfinite(leaf.grad[[0, 2, 3]]).all()


def _argmax_rows(vocab: int, seed: int) -> torch.Tensor:
    """Rows whose argmax is hard: the first maximal column, across and within blocks and in
    the tail; the first NaN wherever it lies; +inf; a row of only -inf (column 0)."""
    x = torch.randn(12, vocab, generator=torch.Generator().manual_seed(seed))
    last = vocab - 1
    x[1, [3, last]] = 50.0  # a tie across blocks: the first
    x[2, [last - 1, last]] = 50.0  # a tie in the tail
    x[3, 0] = float("nan")
    x[4, [min(7, last), last]] = float("nan")
    x[5, :] = float("-inf")
    x[6, [last // 2, last]] = float("inf")
    x[7, last // 3] = float("nan")
    x[7, last] = 1e30  # a NaN before the max: the NaN
    x[8, last] = float("nan")
    x[8, 0] = 1e30  # a NaN after the max: the NaN
    x[9, :] = 1.0  # all equal: column 0
    return x


@needs_native
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("softcaps", [(None, None), (3.0, None), (None, 0.5)])
def test_first_pass_finds_torchs_argmax_of_each_side(vocab, beta, softcaps):
    """The divergence's first pass with ``top1``: each side's argmax is torch's, of the raw
    logits (also where a softcap's keys tie and the logits do not: 40 and 45 under a cap of 3,
    60 and 70 under 0.5, both round to the cap), and the statistics are those of the pass
    without it; masked rows get -1."""
    student, teacher = _argmax_rows(vocab, vocab), _argmax_rows(vocab, vocab + 1).flip(0)
    student[10, [0, vocab - 1]] = torch.tensor([40.0, 45.0])  # capped alike, not alike raw
    teacher[0, [0, vocab - 1]] = torch.tensor([60.0, 70.0])
    spec = tuple(divergence_spec(beta, 1.0, *softcaps))
    ext = _native.extension()
    arg = RowLayout(1, 12, 0, vocab).native_arg()
    top1 = torch.full((2, 12), -7, dtype=torch.long)  # poisoned: every entry must be written
    partials = ext.divergence_stats(student, arg, teacher, arg, 12, None, spec, True, top1)
    assert torch.equal(top1[0], student.argmax(-1))
    assert torch.equal(top1[1], teacher.argmax(-1))
    plain = ext.divergence_stats(student, arg, teacher, arg, 12, None, spec, True)
    torch.testing.assert_close(partials, plain, rtol=0, atol=0, equal_nan=True)
    mask = torch.arange(12) % 3 != 1
    top1.fill_(-7)
    ext.divergence_stats(student, arg, teacher, arg, 12, mask, spec, True, top1)
    expected = torch.stack([student.argmax(-1), teacher.argmax(-1)]).masked_fill(~mask, -1)
    assert torch.equal(top1, expected)
    with pytest.raises(RuntimeError, match=r"top1 must be a contiguous CPU int64 \[2, 12\]"):
        ext.divergence_stats(student, arg, teacher, arg, 12, None, spec, True, top1[:1])
    with pytest.raises(RuntimeError, match="top1 is found for float32 logits"):
        ext.divergence_stats(student.bfloat16(), arg, teacher, arg, 12, None, spec, True, top1)


@needs_native
def test_extension_checks_its_arguments():
    ext = _native.extension()
    x, targets = torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    reverse_kl = tuple(divergence_spec(1.0, 1.0, None, None))
    with pytest.raises(RuntimeError, match="logits: the row layout reaches past the storage"):
        ext.softmax_stats(x, (4, 0, 11), 4, targets, 0, None, 1.0, None, False)
    with pytest.raises(RuntimeError, match="logits must be float32, bfloat16 or float16, not Double"):
        ext.softmax_stats(x.double(), (4, 0, 10), 4, targets, 0, None, 1.0, None, False)
    with pytest.raises(RuntimeError, match="targets must be a contiguous CPU Long tensor of 4 elements"):
        ext.softmax_stats(x, (4, 0, 10), 4, targets.int(), 0, None, 1.0, None, False)
    with pytest.raises(RuntimeError, match="grad_out must have the logits' vocabulary size and dtype"):
        ext.logprobs_grad(x, (4, 0, 10), 4, x.half(), (4, 0, 10), targets, 0, None, 1.0, None,
                          None, torch.zeros(4), None, torch.ones(4), None)
    with pytest.raises(RuntimeError, match="mask must be a contiguous CPU Bool tensor of 4 elements"):
        ext.divergence_stats(x, (4, 0, 10), x, (4, 0, 10), 4, torch.ones(4), reverse_kl, False)
    with pytest.raises(RuntimeError, match="stats must be a contiguous CPU float \\[4, 6\\] tensor"):
        ext.divergence_mixture(x, (4, 0, 10), x, (4, 0, 10), 4, None, torch.zeros(4, 5),
                               reverse_kl)
    with pytest.raises(RuntimeError, match="unknown mode 7"):
        ext.divergence_stats(x, (4, 0, 10), x, (4, 0, 10), 4, None, (7, *reverse_kl[1:]), False)


@pytest.mark.slow
def test_without_a_compiler_it_warns_once_and_falls_back_to_torch(tmp_path):
    """A fresh build folder and a compiler that fails: one RuntimeWarning, then the torch path."""
    script = textwrap.dedent("""
        import warnings
        import torch
        import fastalign as fa
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backend = fa.select_backend("cpu")
            logprobs = fa.token_logprobs(torch.randn(3, 40), torch.tensor([1, 2, 3]))
            fa.token_logprobs(torch.randn(3, 40), torch.tensor([1, 2, 3]))
        messages = [str(w.message) for w in caught if "native" in str(w.message)]
        print(backend, len(messages), bool(torch.isfinite(logprobs).all()))
        print(messages[0] if messages else "")
    """)
    env = dict(os.environ, CXX="false", FASTALIGN_NATIVE_BUILD_DIR=str(tmp_path),
               TRITON_INTERPRET="0")
    env.pop("FASTALIGN_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first, message = result.stdout.splitlines()[:2]
    assert first == "torch 1 True"
    assert "the native CPU extension could not be built" in message
    assert "CPU ops use the slower torch backend" in message
