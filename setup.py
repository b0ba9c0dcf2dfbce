"""Package layout for fastalign.

Everything lives under ``fastalign/``: the Triton kernels (``fastalign.kernels``) and the C++
sources of the native CPU kernels (``fastalign/csrc/``, compiled just in time by
``fastalign._native``) too, so that no top-level folder of the repository can shadow a PyPI
package of its name (Hugging Face's ``kernels``). ``tests/test_packaging.py`` builds the wheel
and checks its contents.
"""

from setuptools import find_packages, setup

setup(
    # Every package under fastalign/ (a new subpackage cannot be forgotten here), then the
    # folders of data without an __init__.py: the bundled data and the C++ sources.
    packages=[*find_packages(include=["fastalign", "fastalign.*"]), "fastalign.data",
              "fastalign.csrc"],
    # The C++ sources travel with the package: fastalign._native builds them on first use. The
    # demo's preference pairs are the data-only package fastalign.data (declared, so setuptools
    # has nothing to warn about).
    package_data={"fastalign.csrc": ["*.cpp", "*.h"], "fastalign.data": ["*.jsonl"]},
    # Here rather than in pyproject.toml: the TOML-table form is deprecated by setuptools >= 77,
    # and the SPDX-string form is refused by the older setuptools of some GPU images.
    license="Apache-2.0",
)
