"""``fastalign.token_divergence``: the exact full-vocabulary divergence between a student's and a
teacher's next-token distributions per token, from logits that exist already; TRL's ``beta``
picks forward KL, reverse KL or the generalized JSD between them. ``token_kl`` is its beta = 1
case (``ops/kl.py``).

One pass over the vocabulary (``fastalign.kernels.divergence`` or a backend twin) gives both
softmaxes' statistics, the KL's cross term and the student's entropy; the JSD, whose mixture
needs both normalizers, takes a second (``_vocab_stats.divergence_over_slices``). A pair of
``torch.library`` custom ops: no graph break under ``torch.compile``.
"""

from __future__ import annotations

import torch

from .. import _validation as checks
from .._backend import select_backend
from .._layout import row_layout
from ..kernels.divergence_interface import ROW_STATS, divergence_spec
from . import _vocab_stats
from ._backends import divergence_launchers, new_gradient
from ._fused_op import Options, fused_op

OPTIONS = Options("DivergenceOptions",
                  "float beta, float inv_temperature, float? softcap, float? teacher_softcap, "
                  "bool return_entropy, str backend")


def spec_of(o):
    """The launchers' ``DivergenceSpec`` of an op's options."""
    return divergence_spec(o.beta, o.inv_temperature, o.softcap, o.teacher_softcap)


def no_entropy(like: torch.Tensor) -> torch.Tensor:
    """The entropy output when it was not asked for: an empty float32 tensor."""
    return like.new_empty(0, dtype=torch.float32)


def fake_outputs(like: torch.Tensor, n_rows: int, o):
    """``(divergence, entropy, stats)`` shapes of a forward op with ``n_rows`` rows."""
    return (like.new_empty(n_rows, dtype=torch.float32),
            like.new_empty(n_rows if o.return_entropy else 0, dtype=torch.float32),
            like.new_empty(n_rows, ROW_STATS, dtype=torch.float32))


@fused_op("fastalign::token_divergence_forward", OPTIONS,
          tensors="Tensor logits, Tensor teacher_logits, Tensor? mask",
          returns="(Tensor, Tensor, Tensor)")
def _forward_op(logits, teacher_logits, mask, o):
    """``(divergence [N], entropy [N] or [0], stats [N, ROW_STATS])``, float32, for ``[..., V]``
    logits with N rows and a flat ``[N]`` mask (``stats``: what the backward needs,
    ``kernels/divergence_interface.py``)."""
    logits, layout = row_layout(logits)
    teacher_logits, teacher_layout = row_layout(teacher_logits)
    launchers, spec = divergence_launchers(o.backend), spec_of(o)
    divergence, entropy, stats = _vocab_stats.divergence_over_slices(
        [None],
        lambda _: launchers.forward(logits, teacher_logits, layout, teacher_layout, mask,
                                    spec=spec, return_entropy=o.return_entropy),
        lambda _, stats: launchers.mixture(logits, teacher_logits, layout, teacher_layout, mask,
                                           stats, spec=spec),
        spec=spec)
    return divergence, entropy if o.return_entropy else no_entropy(logits), stats


@_forward_op.register_fake
def _forward_fake(logits, teacher_logits, mask, o):
    return fake_outputs(logits, logits.numel() // logits.shape[-1], o)


@fused_op("fastalign::token_divergence_backward", OPTIONS,
          tensors="Tensor logits, Tensor teacher_logits, Tensor? mask, Tensor stats, "
                  "Tensor? grad_divergence, Tensor? grad_entropy",
          returns="Tensor")
def _backward_op(logits, teacher_logits, mask, stats, grad_divergence, grad_entropy, o):
    """The gradient w.r.t. ``logits``: a fresh contiguous tensor of their shape and dtype."""
    grad_out = new_gradient(logits, o.backend)
    logits, layout = row_layout(logits)
    teacher_logits, teacher_layout = row_layout(teacher_logits)
    return divergence_launchers(o.backend).backward(
        logits, teacher_logits, layout, teacher_layout, mask, stats, grad_divergence,
        grad_entropy, grad_out, layout.packed(logits.shape[-1]), spec=spec_of(o))


@_backward_op.register_fake
def _backward_fake(logits, *_):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def upstream_grads(o, grad_divergence, grad_entropy):
    """The float32 contiguous upstream gradients a backward op takes (None: not wanted), or
    None when neither is."""
    if not o.return_entropy:
        grad_entropy = None  # the empty placeholder output
    if grad_divergence is None and grad_entropy is None:
        return None
    return tuple(None if g is None else g.float().contiguous()
                 for g in (grad_divergence, grad_entropy))


def _setup_context(ctx, tensors, o, output):
    ctx.save_for_backward(*tensors, output[2])
    # An output nobody differentiates (an entropy kept for logging, the stats) then gets None.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_divergence, grad_entropy, _grad_stats):
    upstream = upstream_grads(ctx.options, grad_divergence, grad_entropy)
    if upstream is None:
        return None, None, None
    logits, teacher_logits, mask, stats = ctx.saved_tensors
    return _backward_op(logits, teacher_logits, mask, stats, *upstream, ctx.options), None, None


_forward_op.register_autograd(_setup_context, _backward)


def check_options(beta, temperature, softcap, teacher_softcap, return_entropy) -> None:
    """The scalar options every divergence op takes (``linear_divergence`` too)."""
    checks.check_number("beta", beta, low=0.0, high=1.0,
                        why="0 is the forward KL(teacher || student), 1 the reverse "
                            "KL(student || teacher), between them the generalized JSD")
    checks.check_temperature(temperature)
    checks.check_softcap(softcap)
    checks.check_scale("teacher_softcap", teacher_softcap, allow_none=True)
    checks.check_flag("return_entropy", return_entropy)


def options_for(device, beta, temperature, softcap, teacher_softcap, return_entropy, *extra):
    """The forward ops' option values (``extra``: a linear op's options beyond these)."""
    return (float(beta), 1.0 / float(temperature),
            None if softcap is None else float(softcap),
            None if teacher_softcap is None else float(teacher_softcap),
            return_entropy, select_backend(device), *extra)


def run_token_divergence(logits, teacher_logits, *, teacher_name: str, beta: float,
                         temperature: float, softcap, teacher_softcap, mask,
                         return_entropy: bool):
    """``token_divergence`` with the teacher's argument called ``teacher_name`` in messages
    (``token_kl`` calls it ``ref_logits``)."""
    checks.check_float_tensor("logits", logits)
    checks.check_float_tensor(teacher_name, teacher_logits)
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"{teacher_name} has shape {tuple(teacher_logits.shape)} but must "
                         f"equal logits.shape = {tuple(logits.shape)}")
    checks.check_same_device(teacher_name, teacher_logits, "logits", logits)
    checks.check_mask(mask, logits.shape[:-1], logits.device, "logits")
    check_options(beta, temperature, softcap, teacher_softcap, return_entropy)
    if logits.numel() == 0:
        # No rows (a leading dim of 0, perhaps between others: no row layout describes that
        # without a copy that torch skips for empty tensors). Keep the result on the graph.
        divergence = logits.sum(-1, dtype=torch.float32) * 0.0
        return (divergence, divergence.clone()) if return_entropy else divergence
    divergence, entropy, _ = _forward_op(
        logits, teacher_logits.detach(), None if mask is None else mask.reshape(-1).contiguous(),
        OPTIONS.new(*options_for(logits.device, beta, temperature, softcap, teacher_softcap,
                                 return_entropy)))
    divergence = divergence.view(logits.shape[:-1])
    return (divergence, entropy.view(logits.shape[:-1])) if return_entropy else divergence


def token_divergence(logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 1.0,
                     temperature: float = 1.0, softcap: float | None = None,
                     teacher_softcap: float | None = None, mask: torch.Tensor | None = None,
                     return_entropy: bool = False):
    """Exact per-row divergence between the student's ``p_s = softmax(softcap(z) / T)`` and the
    teacher's ``p_t = softmax(teacher_softcap(z_t) / T)`` over the full vocabulary, with TRL's
    ``beta`` (``DistillationTrainer``, ``trl.kernels.chunked_divergence``):

    * ``beta = 0``: the forward KL ``KL(p_t || p_s) = sum p_t (log p_t - log p_s)``;
    * ``beta = 1``: the reverse KL ``KL(p_s || p_t)`` (:func:`token_kl`);
    * ``0 < beta < 1``: the generalized Jensen-Shannon divergence
      ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with the mixture
      ``m = (1 - beta) p_s + beta p_t``, unscaled (``beta = 0.5`` is the plain JSD; it tends
      to 0, not to either KL, as ``beta`` nears 0 or 1: the two ends are their own cases, as
      in TRL).

    Args:
        logits: ``[..., V]`` student logits, float16/bfloat16/float32, any strides (the
            ``[:, :-1]`` slice of ``[B, T, V]`` logits is read in place).
        teacher_logits: ``[..., V]`` teacher logits, same shape and device, any float dtype;
            constant (no gradient flows to them).
        beta: in ``[0, 1]``, see above.
        temperature: divides both sides' (soft-capped) logits; a finite number in
            ``[1.18e-38, 8.51e37]`` (as in :func:`token_logprobs`).
        softcap, teacher_softcap: ``None`` or a cap ``s`` in the same range applied as
            ``s * tanh(z / s)`` to that side's logits before the temperature (each model its
            own, e.g. Gemma-2's ``final_logit_softcapping``).
        mask: ``[...]`` bool or None. False rows give 0 in every output, get zero gradient and
            are skipped by the Triton and native kernels (the torch path computes and discards
            them).
        return_entropy: also return the student's entropy ``-sum p_s log p_s`` per row (from
            the same pass), differentiable like :func:`token_logprobs`' entropy.

    Returns:
        ``divergence [...]`` float32, or ``(divergence, entropy)``; differentiable w.r.t.
        ``logits`` only. Extra memory: a few float32 per row in forward; the returned gradient
        only, in backward. The JSD reads both logits twice in forward (its mixture needs both
        normalizers first), the KLs once.

    Edges: columns where a side's probability is 0 (-inf logits) contribute 0 to that side's
    terms. A KL is +inf where its weighting side has mass and the other none (the reverse KL
    where the teacher's logit is -inf and the student's is not, the forward KL the other way
    round), even where the mass underflows float32; its gradient row is then not finite. The
    JSD stays finite there (the mixture never vanishes where either side has mass). A NaN or
    +inf logit on either side, or a row of only -inf, gives NaN and a NaN gradient row. A KL
    within a factor V of float32's max may overflow to inf (as :func:`token_kl`'s: its cross
    term is summed before it is divided by the weighting side's sum); the JSD, bounded by
    the binary entropy of ``beta`` (at most log 2), keeps float32's absolute precision (about
    1e-7 times the size of the log-probs).
    """
    return run_token_divergence(logits, teacher_logits, teacher_name="teacher_logits", beta=beta,
                                temperature=temperature, softcap=softcap,
                                teacher_softcap=teacher_softcap, mask=mask,
                                return_entropy=return_entropy)
