"""The Triton kernels of the GPU backend (under ``TRITON_INTERPRET=1``, the CPU tests'): one
module per op family, imported lazily by ``fastalign.ops._backends`` (they need ``triton``).
docs/architecture.md says what each file holds."""
