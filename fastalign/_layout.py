"""How the rows of a ``[..., V]`` tensor sit in memory, without copying it.

Kernels address row ``r`` of a ``[..., V]`` tensor as ``(r // n_inner) * stride_outer +
(r % n_inner) * stride_inner`` (element strides). Two levels cover a contiguous tensor and the
common non-contiguous case, the ``[:, :-1]`` slice of ``[B, T, V]`` logits, with no copy. Deeper
non-mergeable layouts, or a vocabulary dimension that is not unit-stride, are copied once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class RowLayout:
    """The one row-layout type: every launcher (torch, Triton, native) takes it whole. The C++
    kernels hold the same struct (``csrc/rows.h`` ``RowLayout``) and receive it as
    :meth:`native_arg`; Triton kernels take its fields as scalars (``kernels/_rows.py``)."""
    n_outer: int
    n_inner: int
    stride_outer: int
    stride_inner: int

    @property
    def n_rows(self) -> int:
        return self.n_outer * self.n_inner

    def packed(self, vocab_size: int) -> "RowLayout":
        """The same rows in a fresh contiguous ``[..., V]`` tensor (where a gradient goes)."""
        return RowLayout(self.n_outer, self.n_inner, self.n_inner * vocab_size, vocab_size)

    def native_arg(self) -> tuple[int, int, int]:
        """``(n_inner, stride_outer, stride_inner)``: what ``csrc/rows.h`` ``checked_layout``
        turns back into its ``RowLayout`` (``n_outer`` follows from the row count)."""
        return self.n_inner, self.stride_outer, self.stride_inner


def _merged_leading_dims(x: torch.Tensor) -> list[tuple[int, int]]:
    """(size, stride) of the leading dims of ``x`` with size-1 dims dropped and adjacent dims
    merged wherever ``x[..., :]`` rows of the outer dim continue the inner one."""
    merged: list[tuple[int, int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    return merged


def needs_copy(x: torch.Tensor) -> bool:
    """True when the rows of ``x`` cannot be addressed by a :class:`RowLayout` in place."""
    return x.stride(-1) != 1 or len(_merged_leading_dims(x)) > 2


def row_layout(x: torch.Tensor) -> tuple[torch.Tensor, RowLayout]:
    """``x`` (or a contiguous copy of it when its layout needs one) and its :class:`RowLayout`."""
    dims = _merged_leading_dims(x)
    if needs_copy(x):
        x = x.contiguous()
        dims = _merged_leading_dims(x)
    if not dims:
        return x, RowLayout(1, 1, 0, 0)
    if len(dims) == 1:
        return x, RowLayout(1, dims[0][0], 0, dims[0][1])
    (n_outer, stride_outer), (n_inner, stride_inner) = dims
    return x, RowLayout(n_outer, n_inner, stride_outer, stride_inner)


def row_view(x: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """The rows of ``x`` as an ``[n_outer, n_inner, V]`` view of its memory (no copy), for
    reading or writing a few columns of every row in place."""
    return x.as_strided((layout.n_outer, layout.n_inner, x.shape[-1]),
                        (layout.stride_outer, layout.stride_inner, 1), x.storage_offset())


def iter_row_chunks(x: torch.Tensor, layout: RowLayout,
                    rows_per_chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields ``(first_row, rows)``: ``[c, V]`` views of consecutive rows of ``x``, in order."""
    for start, stop in iter_aligned_row_ranges([layout], rows_per_chunk):
        yield start, row_block(x, layout, start, stop)


def row_block(x: torch.Tensor, layout: RowLayout, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``x`` as a ``[stop - start, V]`` view; they must lie in one
    outer block (``start // n_inner == (stop - 1) // n_inner``)."""
    outer, inner = divmod(start, layout.n_inner)
    offset = x.storage_offset() + outer * layout.stride_outer + inner * layout.stride_inner
    return x.as_strided((stop - start, x.shape[-1]), (layout.stride_inner, 1), offset)


def iter_aligned_row_ranges(layouts: list[RowLayout],
                            rows_per_chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of at most ``rows_per_chunk`` rows, each inside one outer block
    of every layout, covering all rows in order (for tensors read side by side)."""
    n_rows = layouts[0].n_rows
    start = 0
    while start < n_rows:
        stop = min([n_rows, start + rows_per_chunk]
                   + [(start // lay.n_inner + 1) * lay.n_inner for lay in layouts])
        yield start, stop
        start = stop
