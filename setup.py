"""Package layout for fastalign.

The Triton kernels live in the top-level folder ``kernels/`` of the repository but are installed
as ``fastalign.kernels``: a top-level ``kernels`` module would shadow the unrelated PyPI package
of that name. Likewise ``csrc/`` (the C++ sources of the native CPU kernels, compiled just in
time by ``fastalign._native``) is installed as ``fastalign.csrc``. ``tests/test_packaging.py``
builds the wheel and checks both mappings.
"""

from setuptools import find_packages, setup

setup(
    # Every package under fastalign/ (a new subpackage cannot be forgotten here), then the
    # folders without an __init__.py: the bundled data and the two installed under fastalign.
    packages=[*find_packages(include=["fastalign", "fastalign.*"]), "fastalign.data",
              "fastalign.kernels", "fastalign.csrc"],
    package_dir={"fastalign": "fastalign", "fastalign.kernels": "kernels",
                 "fastalign.csrc": "csrc"},
    # The C++ sources travel with the package: fastalign._native builds them on first use. The
    # demo's preference pairs are the data-only package fastalign.data (declared, so setuptools
    # has nothing to warn about).
    package_data={"fastalign.csrc": ["*.cpp", "*.h"], "fastalign.data": ["*.jsonl"]},
    # Here rather than in pyproject.toml: the TOML-table form is deprecated by setuptools >= 77,
    # and the SPDX-string form is refused by the older setuptools of some GPU images.
    license="Apache-2.0",
)
