"""Reductions shared by the losses and the advantage math."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, processes=None) -> torch.Tensor:
    """Mean over ``mask`` (0/1 or bool); 0 for an empty mask rather than NaN. With
    ``processes`` on several ranks (anything with ``distributed`` and ``sum(tensor)``, the
    trainers' ``trainer/distributed.py::Processes``): the mean over every rank's rows, from one
    sum over the ranks of the two local sums."""
    mask = mask.to(values.dtype)
    if processes is None or not processes.distributed:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    sums = processes.sum(torch.stack([(values * mask).sum(), mask.sum()]))
    return sums[0] / sums[1].clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, processes=None) -> torch.Tensor:
    """The (biased) variance over ``mask``, of every rank's rows with ``processes``."""
    return masked_mean((values - masked_mean(values, mask, processes)).square(), mask, processes)
