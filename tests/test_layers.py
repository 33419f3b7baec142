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
    '"RANK"': {"dataio/ranks.py"},  # the launcher's rank (dataio.ranks: env_ranks, rank_world)
    "def length_mask": {"dataio/masks.py"},  # which positions of a padded batch are real
    "class Shard:": {"dataio/shard_index.py"},  # the shard index (no circle: plan and readers import it)
    "torch.autocast(": {"scan/precision.py"},  # mixed precision: names, dtypes, auto, autocast
    "avx512_bf16": {"scan/precision.py"},  # native bf16 (train.precision auto)
}


@pytest.mark.parametrize("pattern", sorted(_HOMES))
def test_each_mechanism_has_one_home(pattern):
    found = {str(p.relative_to(ROOT)) for p in _modules() if pattern in p.read_text(encoding="utf-8")}
    assert found <= _HOMES[pattern], f"{pattern!r} written outside its home: {sorted(found - _HOMES[pattern])}"


def _module_imports(path: Path, names: set[str]) -> set[str]:
    """The product modules ``path`` imports at module level (``if TYPE_CHECKING:`` blocks included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = [*tree.body, *(m for n in tree.body if isinstance(n, ast.If) for m in n.body)]
    found = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name in names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            found |= {f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in names else n.module
                      for a in n.names} & names
    return found


def test_no_import_circle():
    """No module imports, through others, one that imports it (e.g. the epoch plan and the
    readers both start from ``dataio.shard_index`` instead of importing each other)."""
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in _modules()}
    graph = {m: _module_imports(p, set(names)) - {m} for m, p in names.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import circle: " + " -> ".join(path[path.index(n):] + [m, n]) \
                if n in path else f"import circle: {m} -> {n}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
