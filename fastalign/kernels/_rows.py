"""Row addressing and launch sizes shared by the row-streaming kernels (token_logprobs, kl)."""

import triton
import triton.language as tl  # noqa: F401  (jit functions need tl in their globals)


@triton.jit
def row_offset(row, n_inner, stride_outer, stride_inner):
    """Element offset of row ``row`` under a two-level ``RowLayout`` (fastalign/_layout.py)."""
    return (row // n_inner) * stride_outer + (row % n_inner) * stride_inner


def block_and_warps(vocab_size: int, block_v: int, num_warps: int) -> tuple[int, int]:
    """The tile width for a row of ``vocab_size`` and the warps worth giving it."""
    block = min(block_v, triton.next_power_of_2(vocab_size))
    # Small tiles gain nothing from many warps (and tiny ones would leave threads idle).
    return block, max(1, min(num_warps, block // 256))
