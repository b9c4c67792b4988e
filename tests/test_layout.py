"""The package layout the design asks for: imports flow compress -> export, runtimes, calibration."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEAVES = {"calibration": {"calibration"}, "export": {"export"}, "runtimes": {"runtimes"}}
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
