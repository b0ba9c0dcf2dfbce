"""The sampled-token KL estimators k1, k2, k3 in torch: the one torch home of their math
(the Triton one is ``kernels/policy.py::_kl_and_grad``).

Loss math, exported as ``fastalign.losses.kl_estimate``, but it lives in the op layer because
the torch row of the policy family (``ops/policy_torch.py``) adds it to every token's loss, and
ops never import ``fastalign.losses`` (the layer above them).
"""

from __future__ import annotations

import torch

from .._validation import check_choice
from ..kernels.policy_interface import KL_KINDS

# k3 = exp(r) - r - 1 = r^2 (1/2 + r/6 + r^2/24 + ...) for |r| below this: expm1(r) - r would
# cancel (float32 error 3e-4 relative at r = 1e-4, 2 / |r| ulps in general); at |r| = 0.1 the
# next term (r^7 / 5040) is 4e-9 of the sum, and above it the cancellation costs < 20 ulps.
K3_SERIES_BELOW = 0.1


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3"):
    """Sampled-token estimators of KL(pi || pi_ref) (Schulman, "Approximating KL divergence",
    2020), with ``r = ref_logprobs - logprobs``: ``k1 = -r``, ``k2 = r^2 / 2``,
    ``k3 = exp(r) - r - 1`` (unbiased and always >= 0). Elementwise, differentiable, in the
    inputs' (promoted) dtype; bf16/fp16 inputs are computed in float32 and rounded once.
    k3 keeps float32's relative precision for small ``|r|`` (a series, not exp(r) - r - 1);
    at ``r = +inf`` (a -inf log-prob under the policy) it is inf (its limit), not inf - inf."""
    check_choice("kind", kind, tuple(KL_KINDS))
    out_dtype = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
    compute = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    r = ref_logprobs.to(compute) - logprobs.to(compute)
    if kind == "k1":
        kl = -r
    elif kind == "k2":
        kl = r.square() / 2
    else:
        kl = _k3(r)
    return kl.to(out_dtype)


def _k3(r: torch.Tensor) -> torch.Tensor:
    # float64's own cancellation (2 / |r| of 1e-16) is below the series' truncation.
    small = r.abs() < (K3_SERIES_BELOW if r.dtype != torch.float64 else 0.0)
    s = torch.where(small, r, 0.0)  # each branch sees only the inputs it is exact for
    series = s * s * (0.5 + s * (1 / 6 + s * (1 / 24 + s * (1 / 120 + s / 720))))
    # r = +inf replaced by the largest finite value gives expm1 = inf minus a finite number
    # (gradient 0 there), where inf - inf would be NaN; a NaN r stays NaN, gradient included.
    largest = torch.finfo(r.dtype).max
    big = torch.where(small, 1.0, r)
    big = torch.where(big > largest, largest, big)
    return torch.where(small, series, torch.expm1(big) - big)
