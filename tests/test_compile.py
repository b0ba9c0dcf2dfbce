"""torch.compile(fullgraph=True) through every op, forward and backward: the custom ops and
their fake implementations leave no graph break, and compiled results equal eager ones."""

import shutil

import pytest
import torch
from conftest import DEVICE

import fastalign as fa
from fastalign.losses import topk_divergence

COMPILERS = ["aot_eager"]
# Inductor on CPU generates C++; without a compiler it cannot run at all.
if DEVICE.type == "cuda" or shutil.which("g++") or shutil.which("clang++"):
    COMPILERS.append("inductor")


@pytest.fixture(autouse=True)
def fresh_inductor_cache(tmp_path, monkeypatch):
    """Each test compiles into its own cache: a graph cached by an older tree (whose ops took
    other arguments) would otherwise be replayed against the new schemas."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def every_op(logits, ref_logits, targets, hidden, weight, ref_hidden, ref_weight, mask, topk,
             teacher):
    lp, ent = fa.token_logprobs(logits, targets, return_entropy=True, softcap=5.0)
    kl = fa.token_kl(logits, ref_logits, mask=mask, temperature=0.9)
    linear_lp, linear_ent = fa.linear_logprobs(hidden, weight, targets, return_entropy=True)
    linear_kl = fa.linear_kl(hidden, weight, ref_hidden, ref_weight, mask=mask)
    # K targets per row, and the top-k distillation loss on them.
    topk_lp = fa.token_logprobs(logits, topk_targets=topk, temperature=0.8).sum(-1)
    student = fa.linear_logprobs(hidden, weight, topk_targets=topk)
    distill = topk_divergence(student.masked_fill(topk == -100, float("-inf")), teacher,
                              beta=0.5, mask=mask)
    # The JSD (two passes) with the student's entropy, and the forward KL of a narrower
    # teacher.
    jsd, jsd_ent = fa.token_divergence(logits, ref_logits, beta=0.3, softcap=6.0,
                                       teacher_softcap=4.0, mask=mask, return_entropy=True)
    forward_kl = fa.linear_divergence(hidden, weight, ref_hidden[..., :9], ref_weight[:, :9],
                                      beta=0.0, temperature=1.2, mask=mask)
    # A little surrounding math, so the graph is more than the ops.
    return (lp + 0.1 * ent + kl + linear_lp - 0.1 * linear_ent + linear_kl + topk_lp
            + distill + jsd + 0.1 * jsd_ent + forward_kl).square().mean()


@pytest.mark.slow
@pytest.mark.parametrize("compiler", COMPILERS)
def test_fullgraph_compile_matches_eager(compiler):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    batch, seq, vocab, dim = 2, 5, 300, 16
    leaves = [torch.randn(batch, seq, vocab, generator=gen), torch.randn(batch, seq, dim, generator=gen),
              torch.randn(vocab, dim, generator=gen)]
    logits, hidden, weight = (x.to(DEVICE).requires_grad_() for x in leaves)
    ref_logits = torch.randn(batch, seq, vocab, generator=gen).to(DEVICE)
    ref_hidden = torch.randn(batch, seq, dim, generator=gen).to(DEVICE)
    ref_weight = torch.randn(vocab, dim, generator=gen).to(DEVICE)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen).to(DEVICE)
    targets[0, 1] = -100
    mask = (torch.rand(batch, seq, generator=gen) > 0.3).to(DEVICE)
    topk = torch.randint(0, vocab, (batch, seq, 3), generator=gen).to(DEVICE)
    topk[1, 2, 1:] = -100
    teacher = torch.log_softmax(torch.randn(batch, seq, vocab, generator=gen), -1)[..., :3]
    teacher = teacher.to(DEVICE).masked_fill(topk == -100, float("-inf"))
    args = (logits, ref_logits, targets, hidden, weight, ref_hidden, ref_weight, mask, topk,
            teacher)

    eager_loss = every_op(*args)
    eager_grads = torch.autograd.grad(eager_loss, (logits, hidden, weight))
    compiled = torch.compile(every_op, fullgraph=True, backend=compiler)
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, (logits, hidden, weight))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fused_losses_compile_without_graph_breaks():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 6, 16, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(50, 16, generator=gen).to(DEVICE).requires_grad_()
    targets = torch.randint(0, 50, (4, 6), generator=gen).to(DEVICE)
    targets[:, :2] = -100
    ref_hidden, ref_weight = hidden.detach() + 0.1, weight.detach() * 0.9
    advantages = torch.randn(4, generator=gen).to(DEVICE)
    old = (torch.randn(4, 6, generator=gen) - 3).to(DEVICE)
    dpo = fa.FusedDPOLoss(loss_type="robust", label_smoothing=0.1)
    grpo = fa.FusedPolicyLoss(kl_coef=0.05, dual_clip=3.0, level="sequence")

    def both(hidden, weight):
        dpo_value, _ = dpo(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight)
        grpo_value, _ = grpo(hidden, weight, targets, advantages, old_logprobs=old,
                             ref_logprobs=old - 0.1)
        return dpo_value + grpo_value

    expected = torch.autograd.grad(both(hidden, weight), (hidden, weight))
    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(hidden, weight), (hidden, weight))
    for grad, wanted in zip(grads, expected):
        torch.testing.assert_close(grad, wanted, rtol=1e-5, atol=1e-6)


def test_the_native_build_status_is_a_constant_of_the_trace_without_importing_dynamo():
    """``_native._build_failure`` carries exactly the mark ``assume_constant_result`` sets
    (written without importing torch._dynamo: if torch renames it, this fails), and importing
    fastalign leaves torch._dynamo unimported (~3 s of every process's start)."""
    import subprocess
    import sys

    from fastalign import _native

    def probe():
        return None

    marks = vars(torch._dynamo.assume_constant_result(probe))
    assert marks == {"_dynamo_marked_constant": True}
    assert {name: vars(_native._build_failure).get(name) for name in marks} == marks
    code = "import sys, fastalign; print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr
