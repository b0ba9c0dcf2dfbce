"""The gradient-in-forward mode of FusedDPOLoss and FusedPolicyLoss (ops/linear_loss.py): the
loss, every gradient and the metrics equal a float64 computation from the naive logits and the
two-pass path, for every DPO loss type and every policy aggregation and level, on every
backend, across several chunks; it runs where it should and steps aside where it must."""

import logging

import pytest
import torch
from conftest import DEVICE, assert_close

import fastalign as fa
from fastalign.losses import dpo_loss, policy_loss
from fastalign.losses.dpo import LOSS_TYPES
from fastalign.losses.policy import AGGREGATIONS

V, D, T = 301, 16, 7  # V odd, a prime: no tile or chunk divides it


def _head(rows, seed, *, bias, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.5
    targets = torch.randint(0, V, (rows, T), generator=gen)
    targets[0, :3] = -100
    targets[rows - 1, T - 2:] = -100
    leaves = [hidden.to(dtype), weight] + ([torch.randn(V, generator=gen)] if bias else [])
    return [x.to(DEVICE).requires_grad_() for x in leaves], targets.to(DEVICE), gen


def _reference_logprobs(hidden, weight, bias, targets, temperature, softcap):
    """float64 per-token log-probs from the naive logits (0 at ignored targets)."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature, -1)
    picked = log_p.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return picked * (targets != -100)


def _check(module, leaves, targets, call, reference_loss, tolerance=1e-5):
    """One-pass (this ``module``) against the float64 reference and the two-pass module."""
    loss, metrics = call(module, leaves)
    grads = torch.autograd.grad(loss, leaves)
    exact = [x.detach().double().requires_grad_() for x in leaves]
    expected = reference_loss(exact)
    expected_grads = torch.autograd.grad(expected, exact)
    assert_close(loss, expected, tolerance, "loss vs float64")
    for grad, wanted, name in zip(grads, expected_grads, ("hidden", "weight", "bias")):
        assert_close(grad, wanted, tolerance, f"{name} gradient vs float64")
    module.gradient_in_forward = False
    two_loss, two_metrics = call(module, leaves)
    two_grads = torch.autograd.grad(two_loss, leaves)
    assert_close(loss, two_loss, tolerance, "loss vs two-pass")
    for grad, wanted in zip(grads, two_grads):
        assert_close(grad, wanted, tolerance, "gradient vs two-pass")
    for name, value in two_metrics.items():
        assert_close(metrics[name], value, tolerance, name)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_every_loss_type_equals_float64_and_two_pass(backend, chunk_counts, loss_type):
    pairs = 3
    leaves, targets, gen = _head(2 * pairs, seed=len(loss_type), bias=True)
    ref_chosen, ref_rejected = (torch.randn(pairs, generator=gen).to(DEVICE) - 40
                                for _ in range(2))
    options = dict(beta=0.2, loss_type=loss_type, label_smoothing=0.1)
    # 0.04 MiB: 34 rows of V=301 per chunk, two pairs of up to 7 + 7 rows: 2 chunks.
    module = fa.FusedDPOLoss(**options, temperature=0.8, softcap=6.0, chunk_mb=0.04)

    def call(m, leaves):
        hidden, weight, bias = leaves
        return m(hidden, weight, targets, bias=bias, ref_chosen_logps=ref_chosen,
                 ref_rejected_logps=ref_rejected)

    def reference(leaves):
        per_token = _reference_logprobs(*leaves, targets, 0.8, 6.0)
        sums = per_token.sum(-1)
        if loss_type == "ipo":
            sums = sums / (targets != -100).sum(-1).clamp(min=1)
        chosen, rejected = sums.chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen.double(), ref_rejected.double(),
                        **options)[0]
    _check(module, leaves, targets, call, reference)
    assert chunk_counts and chunk_counts[0] >= 2  # the one-pass path ran, over several chunks


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_policy_every_aggregation_equals_float64_and_two_pass(backend, chunk_counts, level,
                                                              aggregation):
    rows = 4
    leaves, targets, gen = _head(rows, seed=3, bias=False)
    advantages = torch.randn(rows, generator=gen).to(DEVICE)
    old = (torch.randn(rows, T, generator=gen) * 0.2 - 6).to(DEVICE)
    ref = old + 0.05
    options = dict(clip_low=0.1, clip_high=0.3, dual_clip=3.0, kl_coef=0.1, level=level,
                   aggregation=aggregation, max_length=T)
    module = fa.FusedPolicyLoss(**options, kl_estimator="k3", temperature=1.3, chunk_mb=0.02)

    def call(m, leaves):
        return m(*leaves, targets, advantages, old_logprobs=old, ref_logprobs=ref)

    def reference(leaves):  # 0.02 MiB: 17 rows per chunk
        per_token = _reference_logprobs(*leaves, None, targets, 1.3, None)
        return policy_loss(per_token, old.double(), advantages.double(), targets != -100,
                           ref_logprobs=ref.double(), **options)[0]
    _check(module, leaves, targets, call, reference)
    assert chunk_counts and chunk_counts[0] >= 2


def test_bf16_autocast_stays_within_the_contract(chunk_counts):
    """bf16 hidden states against fp32 master weights (autocast), on the CPU's own path."""
    leaves, targets, gen = _head(4, seed=5, bias=False, dtype=torch.bfloat16)
    advantages = torch.randn(4, generator=gen).to(DEVICE)
    module = fa.FusedPolicyLoss(chunk_mb=0.02)
    loss, _ = module(*leaves, targets, advantages)
    grads = torch.autograd.grad(loss, leaves)
    module.gradient_in_forward = False
    two_loss, _ = module(*leaves, targets, advantages)
    for grad, wanted in zip(grads, torch.autograd.grad(two_loss, leaves)):
        assert grad.dtype == wanted.dtype
        assert_close(grad, wanted, 1e-2, "bf16 gradient vs two-pass")
    assert_close(loss, two_loss, 1e-2, "bf16 loss")
    assert chunk_counts


def test_frozen_head_gets_no_weight_gradient(chunk_counts):
    leaves, targets, gen = _head(2, seed=6, bias=False)
    hidden, weight = leaves
    weight.requires_grad_(False)
    loss, _ = fa.FusedPolicyLoss()(hidden, weight, targets, torch.randn(2).to(DEVICE))
    loss.backward()
    assert weight.grad is None and torch.isfinite(hidden.grad).all() and chunk_counts


def test_where_the_mode_steps_aside(chunk_counts, caplog):
    """Gradients wanted through the advantages, no gradient at all, or a pair larger than a
    chunk: the two-pass path (the last said in a debug log)."""
    leaves, targets, gen = _head(2, seed=7, bias=False)
    advantages = torch.randn(2, generator=gen).to(DEVICE).requires_grad_()
    loss, _ = fa.FusedPolicyLoss()(*leaves, targets, advantages)
    loss.backward()
    assert advantages.grad is not None and not chunk_counts
    with torch.no_grad():
        fa.FusedPolicyLoss()(*leaves, targets, advantages.detach())
    assert not chunk_counts
    with caplog.at_level(logging.DEBUG, logger="fastalign"):
        zero = torch.zeros(1, device=DEVICE)
        loss, _ = fa.FusedDPOLoss(chunk_mb=0.001)(*leaves, targets, ref_chosen_logps=zero,
                                                  ref_rejected_logps=zero)
    assert not chunk_counts and "exceeds the 0.001 MiB chunk" in caplog.text
    assert torch.isfinite(torch.autograd.grad(loss, leaves)[0]).all()


@pytest.mark.parametrize("module", [fa.FusedDPOLoss, fa.FusedPolicyLoss])
def test_options_are_checked_with_their_names(module):
    with pytest.raises(TypeError, match="gradient_in_forward must be True or False"):
        module(gradient_in_forward=1)
    with pytest.raises(ValueError, match="chunk_mb must be a positive finite number"):
        module(chunk_mb=0)


def test_bad_input_is_named_as_linear_logprobs_names_it(chunk_counts):
    """The one-pass path checks what linear_logprobs checks before any kernel runs."""
    leaves, targets, gen = _head(2, seed=8, bias=False)
    hidden, weight = leaves
    advantages = torch.randn(2, generator=gen).to(DEVICE)
    bad = targets.clone()
    bad[1, 1] = V
    with pytest.raises(ValueError, match="targets"):
        fa.FusedPolicyLoss()(hidden, weight, bad, advantages)
    with pytest.raises(ValueError, match=r"weight must have shape \[V, D\]"):
        fa.FusedPolicyLoss()(hidden, weight[:, :-1], targets, advantages)
    zero = torch.zeros(1, device=DEVICE)
    with pytest.raises(TypeError, match="integer tensor"):
        fa.FusedDPOLoss()(hidden, weight, targets.float(), ref_chosen_logps=zero,
                          ref_rejected_logps=zero)
    assert not chunk_counts


@pytest.mark.parametrize("n_rows, limit, sizes", [
    (2048, 392, [342] * 2 + [341] * 4), (2048, 458, [410] * 3 + [409] * 2), (10, 3, [3, 3, 2, 2]),
    (7, 7, [7]), (7, 100, [7]), (1, 1, [1]), (0, 5, [])])
def test_rows_are_split_into_the_fewest_chunks_of_equal_size(n_rows, limit, sizes):
    """The chunks' count is the fewest within ``limit`` rows (each chunk re-reads the heads),
    their sizes differ by one row at most, and every row comes once, in order."""
    from fastalign.ops.linear_loss import split_rows
    rows = torch.arange(n_rows) * 3  # any flat indices
    chunks = split_rows(rows, limit)
    assert [len(c) for c in chunks] == sizes
    assert torch.equal(torch.cat(chunks) if chunks else rows, rows)
