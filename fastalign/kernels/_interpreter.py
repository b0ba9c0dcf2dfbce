"""Whether the Triton kernels of this folder were defined for Triton's CPU interpreter.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined, i.e. when a kernel module is
first imported; every kernel module imports this one, so ``INTERPRETED`` records what they saw
(``fastalign._backend`` refuses to run interpreted kernels that were compiled for the GPU).
"""

import os

# Under the interpreter (CPU tests) tl.dot on bf16 operands returns garbage
# (triton-lang/triton#11584); kernels with dots upcast their operands when this is set.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
