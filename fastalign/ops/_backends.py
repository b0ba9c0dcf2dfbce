"""The backend contract: for each op family a record of its launchers, and ONE table
``(family, backend) -> record`` (``_TABLE`` below) that every op looks its launchers up in.

Every record names its launchers ``forward`` and ``backward`` (the functions behind them keep
the names of their files: ``linear_logprobs_partials`` is the fused-linear ``forward``, and so
on); the docstring of each record says what they take and return. The records hold real
function objects, imported explicitly in the builders below, so go-to-definition follows them.
Builders import lazily (the Triton kernels need ``triton``, the native ones a built
extension) and run on each lookup, so a test that monkeypatches a launcher in its module is
seen (a lookup costs an import-cache hit and a dataclass, microseconds).

Adding a backend: one builder per family it implements, one row per family in ``_TABLE``
(docs/architecture.md, "Adding an op or a backend").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _native
from .._layout import RowLayout


@dataclass(frozen=True)
class TokenLogprobsLaunchers:
    """``forward(logits, targets, layout, *, inv_temperature, softcap, ignore_index,
    return_entropy, support=None) -> (logprobs [N], entropy [N] or None, stats [N, 2])``
    (``support``: the sampler's, ops/_sampler.py; ``inv_temperature`` a float or float32
    ``[N]``, one per row);
    ``backward(logits, targets, layout, stats, entropy, grad_logprobs, grad_entropy, grad_out,
    grad_layout, *, inv_temperature, softcap, ignore_index, support=None)`` writes the
    gradient into ``grad_out`` (the logits themselves with ``grad_layout = layout``, or a
    contiguous tensor of their shape with ``layout.packed(V)``) and returns it. Layouts are
    :class:`fastalign._layout.RowLayout`, as in every record."""
    forward: Callable
    backward: Callable


@dataclass(frozen=True)
class LinearLogprobsLaunchers:
    """``forward(hidden, weight, bias, targets, *, inv_temperature, softcap, return_entropy,
    return_row_stats=False) -> (row_max, sum_exp, sum_exp_shifted or None, target_logit,
    row_stats or None)`` per-slice statistics (``[S, N]``, ``[N]``; ``row_stats`` the three
    ``[S, N]`` of ``_tiles.row_stat_slice_``) that ``_vocab_stats.merge_vocab_partials`` merges;
    ``backward(hidden, weight, bias, targets, stats, entropy, grad_logprobs, grad_entropy,
    start, end, *, inv_temperature, softcap) -> [N, end - start]`` the logits-gradient tile of
    vocabulary columns ``[start, end)`` in ``hidden``'s dtype; ``tile_cols(n_rows, vocab_size)``
    the slice width ``_linear_backward`` walks (also the width of ``linear_divergence``'s
    slices). ``rounds_logits``: the tiles' logits are rounded to ``hidden``'s dtype (torch
    matmuls) rather than kept in float32 (Triton's dots); the logits of ``topk_targets``,
    formed apart from the tiles (``_topk_targets.target_logits``), are rounded alike.
    ``logits_tile(hidden, weight, bias, start, end) -> [N, end - start]`` float32 raw logits
    formed exactly as ``forward`` and ``backward`` form them (the sampler's k-th value,
    ops/_sampler.py, must pick a column the other passes see with the same value).

    The sampler (ops/_sampler.py) passes ``support=`` to ``forward`` and ``backward``, and
    ``inv_temperature`` may be a float32 ``[N]`` tensor (one per row) in every launcher."""
    forward: Callable
    backward: Callable
    tile_cols: Callable
    rounds_logits: bool
    logits_tile: Callable


@dataclass(frozen=True)
class DivergenceLaunchers:
    """Student against teacher logits, both ``[..., V]`` rows with their layouts (``spec``: a
    ``kernels/divergence_interface.py`` ``DivergenceSpec``, the beta's mode, temperature and
    softcaps). ``forward(logits, teacher_logits, layout, teacher_layout, mask, *, spec,
    return_entropy) -> [PARTIALS, N]`` first-pass statistics, merged by
    ``_vocab_stats.merge_divergence_partials``; ``mixture(logits, teacher_logits, layout,
    teacher_layout, mask, stats, *, spec) -> [2, N]`` the JSD's second pass from the merged
    ``[N, ROW_STATS]`` statistics (merged by ``_vocab_stats.merge_mixture_partials``);
    ``backward(logits, teacher_logits, layout, teacher_layout, mask, stats, grad_divergence,
    grad_entropy, grad_out, grad_layout, *, spec)`` writes the gradient w.r.t. the student's
    logits into ``grad_out`` and returns it (either upstream gradient may be None);
    ``mixture_grad(logits, teacher_logits, layout, teacher_layout, mask, stats,
    grad_divergence, *, spec) -> [2, N]`` is ``mixture`` followed by the ``backward`` of
    ``grad_divergence`` into ``logits`` itself, for whole rows of float32 logits (one slice: the
    gradient needs the row's sums) that are not read again: ``teacher_logits`` may be
    overwritten too, and ``stats``' AUX column (``merge_mixture_partials`` writes it)."""
    forward: Callable
    mixture: Callable
    backward: Callable
    mixture_grad: Callable


@dataclass(frozen=True)
class PolicyLaunchers:
    """``forward(logprobs, old, advantages, mask, ref, *, clip_low, clip_high, dual_clip,
    kl_coef, kl_kind, sequence_level) -> [B, STATS]`` float32 masked sums per sequence of
    ``[B, T]`` float32 inputs (columns and ``kl_kind`` codes: ``kernels/policy_interface.py``);
    ``backward(..., ref, weights, *, same options) -> [B, T]`` the gradient of
    ``sum_b weights_b * stats[b, LOSS]`` w.r.t. ``logprobs``, or None where ``forward`` is
    differentiable torch ops itself.

    The rows: triton, ``kernels/policy.py``: a forward and a backward kernel, which
    ``ops/policy_stats.py`` runs in a custom op whose gradient reaches ``logprobs`` only.
    torch, ``ops/policy_torch.py``: ``forward`` is torch ops that autograd differentiates through
    ``logprobs``, ``old``, ``advantages`` and ``ref``; ``backward`` None. native: the torch
    launchers (below)."""
    forward: Callable
    backward: Callable | None


def _triton_token_logprobs() -> TokenLogprobsLaunchers:
    from ..kernels import token_logprobs as k
    return TokenLogprobsLaunchers(forward=k.token_logprobs_forward,
                                  backward=k.token_logprobs_backward)


def _native_token_logprobs() -> TokenLogprobsLaunchers:
    from . import token_logprobs_native as k
    return TokenLogprobsLaunchers(forward=k.token_logprobs_forward,
                                  backward=k.token_logprobs_backward)


def _torch_token_logprobs() -> TokenLogprobsLaunchers:
    from . import token_logprobs_torch as k
    return TokenLogprobsLaunchers(forward=k.token_logprobs_forward,
                                  backward=k.token_logprobs_backward)


def _triton_linear_logprobs() -> LinearLogprobsLaunchers:
    from ..kernels import linear_logprobs as k
    return LinearLogprobsLaunchers(forward=k.linear_logprobs_partials,
                                   backward=k.linear_logprobs_grad_tile, tile_cols=k.tile_cols,
                                   rounds_logits=False, logits_tile=k.linear_logits_tile)


def _cublas_linear_logprobs() -> LinearLogprobsLaunchers:
    from . import _tiles
    from . import linear_logprobs_cublas as k
    return LinearLogprobsLaunchers(forward=k.linear_logprobs_partials,
                                   backward=k.linear_logprobs_grad_tile, tile_cols=k.tile_cols,
                                   rounds_logits=True, logits_tile=_tiles.raw_logits_tile)


# The matmuls of the Triton backend's linear_logprobs: "tiles", the fused Triton tiles
# (kernels/linear_logprobs.py, the matmul inside the kernel), or "cublas", torch's GEMMs per
# vocabulary slice with the Triton row kernels after them (ops/linear_logprobs_cublas.py). The
# fused losses (ops/linear_loss.py) and linear_divergence run torch GEMMs already.
# FASTALIGN_CUDA_MATMUL picks one for every call; unset, MEASURED_CUDA_MATMUL does.
CUDA_MATMUL_ENV = "FASTALIGN_CUDA_MATMUL"
CUDA_MATMULS = ("tiles", "cublas")
# Per GPU architecture (CUDA compute capability): ((min_rows, path), ...) in increasing
# min_rows, the faster path at each batch size as a committed sweep of both measured it
# (bench/gpu_check.sh's linear_logprobs step, both paths in one run; bench/pick_cuda_matmul.py
# reads its CSV and prints the entries, with the sweep's commit to name beside them). An
# architecture absent here, or a batch below its first entry, runs "tiles". Empty: the cuBLAS
# path has not run on a GPU yet.
MEASURED_CUDA_MATMUL: dict[tuple[int, int], tuple[tuple[int, str], ...]] = {}


def measured_cuda_matmul(capability: tuple[int, int] | None, n_rows: int,
                         table: dict | None = None) -> str:
    """The path ``table`` (``MEASURED_CUDA_MATMUL``) gives an architecture at ``n_rows``."""
    path = "tiles"
    for min_rows, choice in (MEASURED_CUDA_MATMUL if table is None else table).get(capability,
                                                                                    ()):
        if n_rows >= min_rows:
            path = choice
    return path


def cuda_matmul(device: torch.device | None = None, n_rows: int = 0) -> str:
    """The Triton backend's matmul path for ``linear_logprobs`` of ``n_rows`` rows on
    ``device``: ``CUDA_MATMUL_ENV`` where set, else the measured table's."""
    path = os.environ.get(CUDA_MATMUL_ENV, "").strip()
    if not path:
        cuda = device is not None and device.type == "cuda"
        return measured_cuda_matmul(torch.cuda.get_device_capability(device) if cuda else None,
                                    n_rows)
    if path not in CUDA_MATMULS:
        raise ValueError(f"{CUDA_MATMUL_ENV}={path!r}: choose one of {', '.join(CUDA_MATMULS)} "
                         "(the fused Triton tiles, or cuBLAS GEMMs with Triton row kernels)")
    return path


def _native_linear_logprobs() -> LinearLogprobsLaunchers:
    from . import _tiles
    from . import linear_logprobs_native as k
    return LinearLogprobsLaunchers(forward=k.linear_logprobs_partials,
                                   backward=k.linear_logprobs_grad_tile, tile_cols=_tiles.tile_cols,
                                   rounds_logits=True, logits_tile=_tiles.raw_logits_tile)


def _torch_linear_logprobs() -> LinearLogprobsLaunchers:
    from . import _tiles
    from . import linear_logprobs_torch as k
    return LinearLogprobsLaunchers(forward=k.linear_logprobs_partials,
                                   backward=k.linear_logprobs_grad_tile, tile_cols=_tiles.tile_cols,
                                   rounds_logits=True, logits_tile=_tiles.raw_logits_tile)


def _triton_divergence() -> DivergenceLaunchers:
    from ..kernels import divergence as k
    from ._vocab_stats import mixture_then_grad
    return DivergenceLaunchers(forward=k.divergence_partials, mixture=k.mixture_partials,
                               backward=k.divergence_grad,
                               mixture_grad=mixture_then_grad(k.mixture_partials,
                                                              k.divergence_grad))


def _native_divergence() -> DivergenceLaunchers:
    from . import divergence_native as k
    return DivergenceLaunchers(forward=k.divergence_partials, mixture=k.mixture_partials,
                               backward=k.divergence_grad, mixture_grad=k.mixture_grad)


def _torch_divergence() -> DivergenceLaunchers:
    from . import divergence_torch as k
    from ._vocab_stats import mixture_then_grad
    return DivergenceLaunchers(forward=k.divergence_partials, mixture=k.mixture_partials,
                               backward=k.divergence_grad,
                               mixture_grad=mixture_then_grad(k.mixture_partials,
                                                              k.divergence_grad))


def _triton_policy() -> PolicyLaunchers:
    from ..kernels import policy as k
    return PolicyLaunchers(forward=k.policy_stats, backward=k.policy_grad)


def _torch_policy() -> PolicyLaunchers:
    from . import policy_torch as k
    return PolicyLaunchers(forward=k.policy_stats, backward=None)


# The one table: (op family, backend) -> builder of that family's launchers record.
_TABLE: dict[tuple[str, str], Callable[[], object]] = {
    ("token_logprobs", "triton"): _triton_token_logprobs,
    ("token_logprobs", "native"): _native_token_logprobs,
    ("token_logprobs", "torch"): _torch_token_logprobs,
    ("linear_logprobs", "triton"): _triton_linear_logprobs,
    ("linear_logprobs", "native"): _native_linear_logprobs,
    ("linear_logprobs", "torch"): _torch_linear_logprobs,
    ("divergence", "triton"): _triton_divergence,
    ("divergence", "native"): _native_divergence,
    ("divergence", "torch"): _torch_divergence,
    ("policy", "triton"): _triton_policy,
    # The native extension has no policy kernel: its row is the torch launchers, what the
    # native backend has always run for this family (elementwise [B, T] math, small beside the
    # vocabulary-wide ops), with their autograd through the advantages and the reference.
    ("policy", "native"): _torch_policy,
    ("policy", "torch"): _torch_policy,
}


def _lookup(family: str, backend: str):
    builder = _TABLE.get((family, backend))
    if builder is None:
        raise RuntimeError(f"{family} has no {backend} backend")
    return builder()


def token_logprobs_launchers(backend: str) -> TokenLogprobsLaunchers:
    return _lookup("token_logprobs", backend)


def linear_logprobs_launchers(backend: str, device: torch.device | None = None,
                              n_rows: int = 0) -> LinearLogprobsLaunchers:
    """The backend's; for the Triton backend, the matmul path ``cuda_matmul`` picks for
    ``n_rows`` rows on ``device``."""
    if backend == "triton" and cuda_matmul(device, n_rows) == "cublas":
        return _cublas_linear_logprobs()
    return _lookup("linear_logprobs", backend)


def divergence_launchers(backend: str) -> DivergenceLaunchers:
    return _lookup("divergence", backend)


def policy_launchers(backend: str) -> PolicyLaunchers:
    return _lookup("policy", backend)


def new_gradient(like: torch.Tensor, backend: str) -> torch.Tensor:
    """The tensor a backward op returns its ``[..., V]`` gradient in: contiguous, ``like``'s
    shape and dtype; the native backend's comes from its reusable huge-page buffers."""
    if backend == "native":
        return _native.new_gradient(like)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def work_buffer(shape, device: torch.device, backend: str, *, zero: bool = False
                ) -> torch.Tensor:
    """A float32 buffer the chunked losses work in (a chunk's logits, the gradients they
    accumulate), zeroed where asked. The native backend's comes from huge pages
    (``csrc/buffers.cpp``, never kept once freed): in 4 KiB pages a 200 MiB chunk is 51k page
    faults, each call. On the 2-core VM the distillation benchmark's loss (N=2048, V=128256)
    took 168k faults and 0.35 s of system time per call that way, 1k and 0.08 s this way."""
    if backend == "native" and device.type == "cpu":
        out = _native.extension().empty_gradient(list(shape), torch.float32, False)
    else:
        out = torch.empty(shape, dtype=torch.float32, device=device)
    return out.zero_() if zero else out


def divergence_partials_and_top1(tile: torch.Tensor, teacher_tile: torch.Tensor, backend: str,
                                 *, spec):
    """``(partials, top1)`` of two contiguous ``[N, V]`` tiles of whole rows: the divergence's
    first-pass statistics (``forward``, with the entropy's) and ``[2, N]`` int64 each side's
    ``argmax(-1)`` of its raw logits (the first maximal column, the first NaN where a row has
    one). The native backend finds the argmax within the first pass, from its block maxes, for
    float32 tiles (``csrc/argmax.h``): torch's CPU argmax walks a row an element at a time,
    about as long as a whole pass of the divergence's math over a chunk."""
    if backend == "native" and tile.dtype == teacher_tile.dtype == torch.float32:
        from . import divergence_native
        return divergence_native.partials_and_top1(tile, teacher_tile, spec=spec)
    layout = RowLayout(1, tile.shape[0], 0, tile.shape[1])
    partials = divergence_launchers(backend).forward(tile, teacher_tile, layout, layout, None,
                                                     spec=spec, return_entropy=True)
    return partials, torch.stack([tile.argmax(-1), teacher_tile.argmax(-1)])
