"""The package layout the design asks for: imports flow compress -> export, runtimes, calibration."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# export writes through runtimes.files and checks parity on a runtime; runtimes never imports export.
LEAVES = {"calibration": {"calibration"}, "export": {"export", "runtimes"}, "runtimes": {"runtimes"}}
FIRST_PARTY = {"compress", "export", "runtimes", "calibration"}
SDKS = {"openvino", "onnxruntime", "tensorrt", "neural_compressor", "nncf"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module.split(".")[0], id(node) in top_level))
    return found


def test_every_package_is_installed():
    """A package folder missing from pyproject's list works in an editable install and breaks in a wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for top in ("compress", "export", "runtimes", "calibration")
               for p in (REPO / top).rglob("__init__.py")}
    assert {"compress", "export", "runtimes", "calibration"} <= on_disk
    assert on_disk == listed, f"pyproject.toml lists {sorted(listed)}, the tree has {sorted(on_disk)}"


def test_leaf_packages_import_only_themselves():
    for package, allowed in LEAVES.items():
        for path in (REPO / package).rglob("*.py"):
            first_party = {m for m, _ in _imports(path) if m in FIRST_PARTY}
            assert first_party <= allowed, f"{path.relative_to(REPO)} imports {first_party - allowed}"


def test_runtime_sdks_are_imported_lazily():
    for package in ("compress", "export", "runtimes", "calibration"):
        for path in (REPO / package).rglob("*.py"):
            eager = {m for m, at_top in _imports(path) if at_top and m in SDKS}
            assert not eager, f"{path.relative_to(REPO)} imports {eager} at module level"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _first_party_edges(path: Path, modules: set[str]) -> set[str]:
    """The first-party modules ``path`` imports, at module level or inside functions; imports under
    ``if TYPE_CHECKING:`` are for annotations only and never run, so they are not edges."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    edges = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            edges |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            named = [alias for alias in node.names if f"{node.module}.{alias.name}" not in modules]
            edges |= submodules | ({node.module} if named else set())
    return edges


def test_no_import_cycles():
    """No first-party module reaches itself through imports, lazy ones included: a cycle means the split between
    modules is wrong, even where a function-level import keeps Python from tripping on it."""
    paths = {_module_name(p): p for top in FIRST_PARTY for p in (REPO / top).rglob("*.py")}
    graph = {name: _first_party_edges(path, set(paths)) - {name} for name, path in paths.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert len(graph) > 40  # the walk saw the whole tree
