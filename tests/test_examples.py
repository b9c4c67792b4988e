"""The scripts in examples/ run as a user would run them, and use nothing but the public API."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import compress

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def test_there_are_examples():
    assert [p.name for p in EXAMPLES] == ["api_tour.py"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_use_only_the_public_api(path):
    tree = ast.parse(path.read_text())
    first_party = {"compress", "export", "runtimes", "calibration"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.module.split(".")[0] not in first_party, f"{path.name}: from {node.module} import ..."
        if isinstance(node, ast.Import):
            assert all(a.name == "compress" or a.name.split(".")[0] not in first_party for a in node.names)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "compress":
            assert node.attr in compress.__all__, f"{path.name} uses compress.{node.attr}, which is not in __all__"


@pytest.mark.slow
def test_api_tour_runs(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "examples" / "api_tour.py"), "--out", str(tmp_path), "--quick"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("int8:  openvino") and "top-1" in line for line in lines), done.stdout
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "run" / "records.jsonl").is_file()
    assert (tmp_path / "run" / "bundle-cpu-x86" / "manifest.json").is_file()  # the recipe deploys


def test_api_functions_take_inputs_positionally_and_options_by_keyword():
    """The NNCF shape: what a call cannot do without comes first and positionally; every option by keyword."""
    import inspect

    functions = [getattr(compress, name) for name in compress.__all__ if inspect.isfunction(getattr(compress, name))]
    assert len(functions) >= 9
    for fn in functions:
        assert fn.__doc__ and len(fn.__doc__.splitlines()) > 2, f"{fn.__name__} is not documented"
        for p in inspect.signature(fn).parameters.values():
            required = p.default is inspect.Parameter.empty
            assert (p.kind == p.POSITIONAL_OR_KEYWORD) == required, f"{fn.__name__}({p.name}): required inputs " \
                "are positional, options keyword-only"
            if not required and "Args:" in fn.__doc__:
                assert f"{p.name}:" in fn.__doc__ or f"{p.name}," in fn.__doc__, f"{fn.__name__}: {p.name} undocumented"
