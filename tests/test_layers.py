"""The layering of the packages: nothing imports from a higher layer, nothing product-side from
``benchmarks/`` or ``tests/``, and every module of a package is importable on its own."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first: a module may import its own layer and those below it.
LAYERS = {"dataio": 0, "scan": 1, "trainer": 2, "tools": 3, "cluster": 4, "app": 5}


def _modules() -> list[Path]:
    return sorted(p for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the file, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_or_benchmark_import(path):
    own = path.relative_to(ROOT).parts[0]
    for line, top in _imports(path):
        assert top not in ("benchmarks", "tests"), f"{path.relative_to(ROOT)}:{line} imports {top}"
        if top in LAYERS:
            assert LAYERS[top] <= LAYERS[own], (
                f"{path.relative_to(ROOT)}:{line} imports {top} (layer {LAYERS[top]}) from {own} "
                f"(layer {LAYERS[own]})")


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_imports_alone(path):
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    importlib.import_module(name)


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal that is not a docstring (comments are not in the AST)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docstrings]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_product_never_runs_a_file_from_benchmarks(path):
    """What the product runs lives in the packages: no path into benchmarks/ or tests/."""
    for line, text in _string_literals(path):
        assert "benchmarks" not in text and "tests/" not in text, \
            f"{path.relative_to(ROOT)}:{line} names {text!r}"


# One home per mechanism: where each may be written.
_HOMES = {
    "os.replace(": {"dataio/storage.py", "trainer/checkpoint.py"},  # the atomic write; a checkpoint's directory rename
    ".tmp-": {"dataio/storage.py"},  # the temp-name rule (storage.temp_name, storage.is_temp_name)
    "is_initialized()": {"scan/collectives.py", "cluster/local_ray.py"},  # is a process group (a Ray) running
    "dist_nn.all_gather": {"scan/collectives.py"},  # the padded all-gather
    'bind(("127.0.0.1", 0))': {"trainer/distributed.py"},  # the free-port helper
}


@pytest.mark.parametrize("pattern", sorted(_HOMES))
def test_each_mechanism_has_one_home(pattern):
    found = {str(p.relative_to(ROOT)) for p in _modules() if pattern in p.read_text(encoding="utf-8")}
    assert found <= _HOMES[pattern], f"{pattern!r} written outside its home: {sorted(found - _HOMES[pattern])}"
