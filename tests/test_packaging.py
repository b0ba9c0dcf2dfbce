"""No name of the repository shadows a third-party package: the wheel installs the Triton kernels
and the C++ sources as fastalign.kernels / fastalign.csrc, and from the repository root, where
`python -m`, `python -c`, torchrun and the worker subprocesses put the root on sys.path, PyPI's
`kernels` (Hugging Face's kernel hub, imported by transformers >= 5.25) is the one imported."""

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
    import fcntl

    out = tmp_path_factory.mktemp("wheel")
    # pip builds a local project in its own folder (build/, *.egg-info): two test workers
    # building at once would collide there, so they take turns.
    (ROOT / "build").mkdir(exist_ok=True)
    with open(ROOT / "build" / ".wheel-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _build_wheel(out)
    (path,) = out.glob("fastalign-*.whl")
    return path


def _build_wheel(out: Path) -> None:
    import shutil

    # setuptools copies into build/lib and never removes what the tree no longer has: a file
    # moved since the last build would otherwise ship twice.
    shutil.rmtree(ROOT / "build" / "lib", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, capture_output=True)


@pytest.mark.slow
def test_wheel_maps_kernels_under_fastalign(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastalign/kernels/_interpreter.py" in names
    assert "fastalign/kernels/token_logprobs.py" in names
    assert "fastalign/ops/token_logprobs.py" in names
    assert "fastalign/losses/policy.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels/ would shadow PyPI's"
    # The C++ sources travel in the wheel: fastalign._native builds them on first use.
    from fastalign import _native

    for source in (*_native.SOURCES, "kernels.h", "rows.h", "divergence.h"):
        assert f"fastalign/csrc/{source}" in names
    assert not [n for n in names if n.startswith("csrc/")]
    # The trainer layer and the demo's bundled preference pairs.
    assert "fastalign/trainer/algorithms/dpo.py" in names
    assert "fastalign/data/demo_preferences.jsonl" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]


@pytest.mark.slow
def test_unpacked_wheel_imports(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import sys, importlib.util; sys.path.insert(0, sys.argv[1]);"
            "import fastalign, fastalign.kernels;"
            "import fastalign.kernels.token_logprobs, fastalign._native;"
            "import fastalign.integrations, fastalign.trainer;"  # every subpackage shipped
            "assert list(fastalign.kernels.__path__) == [sys.argv[1] + '/fastalign/kernels'], fastalign.kernels.__path__;"
            "assert str(fastalign._native._source_dir()).startswith(sys.argv[1]), fastalign._native._source_dir();"
            "spec = importlib.util.find_spec('kernels');"
            "assert spec is None or not spec.origin.startswith(sys.argv[1]), spec")
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], check=True, cwd=tmp_path, env=env)


# The repository's top-level folders besides fastalign/: none is imported by name, and none is
# named like a package fastalign runs beside (``python -m``, ``torchrun`` and worker processes
# put the repository root first on sys.path, where a folder named ``kernels`` once shadowed
# Hugging Face's). A new one must be added here on purpose.
TOP_LEVEL_FOLDERS = {"fastalign", "tests", "bench", "docs", "examples", "scripts"}


def test_no_top_level_folder_or_module_can_shadow_a_package():
    """Only fastalign/ is a regular package at the top level, and every other top-level folder
    the repository tracks is one of the project's own (hidden ones aside; outputs such as
    make demo's are not tracked)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:
        folders = {name.split("/")[0] for name in tracked.stdout.splitlines() if "/" in name}
        folders = {name for name in folders if not name.startswith(".")}
        assert folders <= TOP_LEVEL_FOLDERS, \
            f"unexpected top-level folders: {folders - TOP_LEVEL_FOLDERS}"
    shadowing = [path.name for path in ROOT.iterdir()
                 if path.name != "fastalign" and (path / "__init__.py").is_file()]
    shadowing += [path.name for path in ROOT.glob("*.py") if path.name != "setup.py"]
    shadowing += [path.name for path in ROOT.glob("*.so")]
    assert not shadowing, f"importable from the repository root as top-level names: {shadowing}"


def _run_from_root(*args, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.mark.slow
def test_transformers_and_fastalign_import_from_the_repository_root():
    """`python -c` from the root puts the root first on sys.path, as `python -m` does: PyPI's
    kernels (installed with transformers >= 5.25, and by the test extra) must still win."""
    code = ("import sys, kernels;"
            "assert 'site-packages' in kernels.__file__, kernels.__file__;"
            "from kernels import CUDAProperties;"
            "import transformers, transformers.integrations.hub_kernels;"
            "import fastalign, fastalign.kernels.token_logprobs;"
            "assert list(fastalign.kernels.__path__) == [sys.argv[1]], fastalign.kernels.__path__;"
            "from fastalign.trainer import tiny_llama; tiny_llama(vocab_size=300, hidden_size=16, num_layers=1);"
            "print('ok')")
    done = _run_from_root("-c", code, str(ROOT / "fastalign" / "kernels"))
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.slow
def test_python_dash_m_and_torchrun_start_from_the_repository_root():
    done = _run_from_root("-m", "fastalign.demo", "--help")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-3000:]
    # torchrun starts its workers with the working directory first on sys.path too.
    code = "import transformers.integrations.hub_kernels, fastalign.trainer; print('ok')"
    done = _run_from_root("-m", "torch.distributed.run", "--nproc-per-node", "1",
                          "--no-python", sys.executable, "-c", code)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
