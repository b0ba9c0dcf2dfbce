"""Compacting skipped rows (ignored targets, masked tokens) out before the kernels run, and
placing the results back. Nothing is copied when every row is kept (the common case)."""

from __future__ import annotations

import torch


def kept_rows(keep: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows to compute, or None when ``keep`` is all True."""
    if bool(keep.all()):  # one host sync; the index list needs it anyway
        return None
    return keep.nonzero().squeeze(1)


def rows_to_save(rows: torch.Tensor | None, n_rows: int, device: torch.device) -> torch.Tensor:
    """``kept_rows``' answer as a tensor a forward custom op can return for its backward, so the
    backward needs no second host sync: every row kept (None) is saved as ``arange(n_rows)``."""
    return torch.arange(n_rows, device=device) if rows is None else rows


def saved_rows(saved: torch.Tensor, n_rows: int) -> torch.Tensor | None:
    """The inverse of ``rows_to_save``, from metadata only (no sync): as many indices as rows
    means every row."""
    return None if saved.shape[0] == n_rows else saved


def fake_saved_rows(like: torch.Tensor) -> torch.Tensor:
    """``register_fake``'s stand-in for ``rows_to_save``: int64 of a data-dependent length."""
    return like.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)


def select_rows(x: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or rows is None else x.index_select(0, rows)


def scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, n_rows: int) -> torch.Tensor:
    """``values`` of the kept rows placed into zeros of ``n_rows`` rows (skipped rows give 0)."""
    if rows is None:
        return values
    out = values.new_zeros((n_rows, *values.shape[1:]))
    return out.index_copy_(0, rows, values)
