"""docs/architecture.md against the code: adding an op or a backend touches the files the doc
lists, so the doc must name every file of the op layer, every file it names must exist, and its
backend table must hold every launcher family of ops/_backends.py."""

import re
from pathlib import Path

from fastalign.ops import _backends

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()
# Where each short prefix the doc uses lives in the repository.
PREFIXES = {"ops/": "fastalign/ops/", "kernels/": "kernels/", "csrc/": "csrc/",
            "fastalign/": "fastalign/", "tests/": "tests/", "bench/": "bench/"}


def _doc_paths() -> set[str]:
    """Repository paths of the files the doc names in backticks (``ops/x.py::name`` too)."""
    paths = set()
    for token in re.findall(r"`([A-Za-z0-9_./<>*-]+\.(?:py|cpp|h|md))(?:::\w+)?`", DOC):
        if "<" in token or "*" in token:
            continue  # a pattern (ops/<op>.py, test_errors*.py), not a file
        for short, full in PREFIXES.items():
            if token.startswith(short):
                paths.add(full + token[len(short):])
                break
    return paths


def test_every_file_the_doc_names_exists():
    missing = sorted(p for p in _doc_paths() if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def test_the_doc_names_every_file_of_the_op_layer():
    """A file of the ops, kernels or C++ sources the doc does not know is a file a newcomer
    adding an op would not know to touch."""
    layer = [*ROOT.glob("fastalign/ops/*.py"), *ROOT.glob("kernels/*.py"),
             *ROOT.glob("csrc/*.cpp"), *ROOT.glob("csrc/*.h")]
    assert len(layer) > 20
    named = _doc_paths()
    unnamed = sorted(str(p.relative_to(ROOT)) for p in layer if str(p.relative_to(ROOT)) not in named)
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"


def test_the_backend_table_holds_every_family():
    families = {family for family, _ in _backends._TABLE}
    assert families == {"token_logprobs", "linear_logprobs", "kl", "policy"}
    for family in families:
        assert re.search(rf"^\| `{family}` \|", DOC, re.MULTILINE), family
