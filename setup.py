"""Package layout for fastalign.

The Triton kernels live in the top-level folder ``kernels/`` of the repository but are installed
as ``fastalign.kernels``: a top-level ``kernels`` module would shadow the unrelated PyPI package
of that name. Likewise ``csrc/`` (the C++ sources of the native CPU kernels, compiled just in
time by ``fastalign._native``) is installed as ``fastalign.csrc``. ``tests/test_packaging.py``
builds the wheel and checks both mappings.
"""

from setuptools import setup

setup(
    packages=["fastalign", "fastalign.ops", "fastalign.losses", "fastalign.trainer", "fastalign.kernels",
              "fastalign.csrc"],
    package_dir={"fastalign": "fastalign", "fastalign.kernels": "kernels",
                 "fastalign.csrc": "csrc"},
    # The C++ sources travel with the package: fastalign._native builds them on first use. The
    # demo's preference pairs travel as package data (fastalign/data is not a Python package).
    package_data={"fastalign.csrc": ["*.cpp", "*.h"], "fastalign": ["data/*.jsonl"]},
)
