"""Triton kernels of fastalign, installed as ``fastalign.kernels`` (never as a top-level package).

Imported lazily, the first time an op picks the Triton backend: ``triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is defined, and ``INTERPRETED`` records what it saw.
"""

import os

# Under the interpreter (CPU tests) tl.dot on bf16 operands returns garbage
# (triton-lang/triton#11584); kernels with dots upcast their operands when this is set.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

from .token_logprobs import token_logprobs_backward, token_logprobs_forward  # noqa: E402

__all__ = ["INTERPRETED", "token_logprobs_forward", "token_logprobs_backward"]
