"""The wheel installs the Triton kernels as fastalign.kernels and never as a top-level `kernels`
(that name belongs to another PyPI package)."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, capture_output=True)
    (path,) = out.glob("fastalign-*.whl")
    return path


@pytest.mark.slow
def test_wheel_maps_kernels_under_fastalign(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastalign/kernels/__init__.py" in names
    assert "fastalign/kernels/token_logprobs.py" in names
    assert "fastalign/ops/token_logprobs.py" in names
    assert "fastalign/losses/policy.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels/ would shadow PyPI's"
    # The C++ sources travel in the wheel: fastalign._native builds them on first use.
    for source in ("bindings.cpp", "logprobs.cpp", "kl.cpp", "kernels.h", "rows.h"):
        assert f"fastalign/csrc/{source}" in names
    assert not [n for n in names if n.startswith("csrc/")]
    # The trainer layer and the demo's bundled preference pairs.
    assert "fastalign/trainer/dpo.py" in names
    assert "fastalign/data/demo_preferences.jsonl" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]


@pytest.mark.slow
def test_unpacked_wheel_imports(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import sys, importlib.util; sys.path.insert(0, sys.argv[1]);"
            "import fastalign, fastalign.kernels;"
            "assert fastalign.kernels.__file__.startswith(sys.argv[1]), fastalign.kernels.__file__;"
            "spec = importlib.util.find_spec('kernels');"
            "assert spec is None or not spec.origin.startswith(sys.argv[1]), spec")
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], check=True, cwd=tmp_path, env=env)


def test_repository_root_is_not_importable_as_kernels():
    """In the development install too, `import kernels` must not find our folder."""
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not str(spec.origin).startswith(str(ROOT / "kernels"))
