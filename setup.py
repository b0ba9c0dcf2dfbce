"""Package layout for fastalign.

The Triton kernels live in the top-level folder ``kernels/`` of the repository but are installed
as ``fastalign.kernels``: a top-level ``kernels`` module would shadow the unrelated PyPI package
of that name. ``tests/test_packaging.py`` builds the wheel and checks this mapping.
"""

from setuptools import setup

setup(
    packages=["fastalign", "fastalign.ops", "fastalign.losses", "fastalign.kernels"],
    package_dir={"fastalign": "fastalign", "fastalign.kernels": "kernels"},
)
