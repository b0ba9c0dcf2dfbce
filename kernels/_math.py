"""Elementwise helpers shared by the kernels: the logits transform and its derivative.

A jit helper returns from one place: Triton 3.6 rejects a function whose constexpr branches
return a block in one case and a scalar in the other."""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tl has no tanh on every Triton we support (3.6-3.9) and libdevice moved between releases.
    # 1 - 2 / (exp(2x) + 1) saturates to +-1 without overflow (exp -> inf gives 1, exp -> 0
    # gives -1); its absolute error near 0 is ~1e-7, which is what the softcap multiplies.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def transform_logits(z, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """z' = softcap(z) / temperature in fp32, with softcap(z) = s * tanh(z / s)."""
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z * inv_temperature


@triton.jit
def softcap_grad(z, softcap):
    """d softcap(z) / dz = 1 - tanh(z / s)^2, at the raw logits z."""
    t = tanh(z / softcap)
    return 1.0 - t * t
