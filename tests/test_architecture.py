"""docs/architecture.md against the code: adding an op, a backend, a loss type or a trainer
touches the files the doc lists, so the doc must name every file of the package, the kernels and
the C++ sources, every file it names must exist, its backend table must hold every launcher
family of ops/_backends.py, and no module may import one that imports it back."""

import re
from pathlib import Path

from fastalign.ops import _backends

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()
# Where each short prefix the doc uses lives in the repository.
PREFIXES = {"ops/": "fastalign/ops/", "kernels/": "fastalign/kernels/", "csrc/": "fastalign/csrc/",
            "fastalign/": "fastalign/", "tests/": "tests/", "bench/": "bench/",
            "trainer/": "fastalign/trainer/", "nn/": "fastalign/nn/",
            "losses/": "fastalign/losses/", "integrations/": "fastalign/integrations/"}


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


def test_the_doc_names_every_file_of_the_package():
    """A file the doc does not know is a file a newcomer adding an op, a loss or a trainer
    would not know to touch (package __init__ files aside: they only re-export)."""
    layer = [*ROOT.glob("fastalign/**/*.py"), *ROOT.glob("fastalign/csrc/*.cpp"),
             *ROOT.glob("fastalign/csrc/*.h")]
    layer = [path for path in layer if path.name != "__init__.py"]
    assert len(layer) > 80
    named = _doc_paths()
    unnamed = sorted(str(p.relative_to(ROOT)) for p in layer if str(p.relative_to(ROOT)) not in named)
    assert not unnamed, f"docs/architecture.md does not name: {unnamed}"


def test_the_backend_table_holds_every_family():
    families = {family for family, _ in _backends._TABLE}
    assert families == {"token_logprobs", "linear_logprobs", "divergence", "policy"}
    for family in families:
        assert re.search(rf"^\| `{family}` \|", DOC, re.MULTILINE), family


def test_every_registered_trainer_is_in_the_doc():
    from fastalign.trainer.registry import TRAINERS

    for name, spec in TRAINERS.items():
        module = spec.build.__module__.replace(".", "/")
        assert f"`{module.removeprefix('fastalign/')}.py`" in DOC, (name, module)


def _imports_of_the_package() -> dict[str, set[str]]:
    """Module -> the fastalign modules it imports, anywhere in its source (a function-level
    import is an edge too: it is a loop all the same, only deferred)."""
    import ast

    files = {}
    for path in (ROOT / "fastalign").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    # fastalign/csrc/ holds C++ sources only: a leaf.
    known = set(files) | {"fastalign.csrc"}

    def module_of(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            edges |= {module_of(t) for t in targets if t.startswith("fastalign")}
        graph[name] = {edge for edge in edges if edge and edge != name}
    return graph


def test_no_import_loops_in_the_package():
    """A loop (a -> b -> ... -> a, through imports at any depth of a function) means the
    layers are not layered: which module is the lower one is an accident of import order."""
    graph = _imports_of_the_package()
    assert len(graph) > 60
    state, loops = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                loops.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not loops, "import loops: " + "; ".join(" -> ".join(loop) for loop in loops)
