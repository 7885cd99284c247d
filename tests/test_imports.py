"""The import graph runs one way where issue 17 found cycles.

    dit_fast/ops/flash_attention.py   (public attention functions)  ->  ops/attention_planner.py ("auto")
            \\-> ops/_attention_checks.py <-/        (the checks both need, below both)
    dit_fast/train.py (the trainer)  ->  train_parallel.py (--sp / --fsdp)
            \\-> train_common.py, train_config.py <-/  (DistInfo, atomic writes, the config)

Two views: the static graph of every ``import`` in the package (module level, inside functions and
under TYPE_CHECKING alike, plus importlib.import_module / sys.modules lookups of literal names), and
fresh processes that import the lower module of each pair with the packages' ``__init__`` files
left out (they import everything) and call into it, then look at sys.modules.
"""

import ast
import functools
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (("dit_fast", ROOT / "dit_fast"), ("dit_fast.triton_kernels", ROOT / "triton_kernels"))


def _modules(packages) -> Dict[str, Path]:
    found = {}
    for package, folder in packages:
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package] + parts)] = path
    return found


def _literal(node) -> str:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""


def _resolve_from(base: str, node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return base
    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]  # from . import x, from ..ops import y
    return ".".join(anchor + ([base] if base else []))


@functools.lru_cache(maxsize=None)
def import_graph(packages=PACKAGES) -> Dict[str, Set[str]]:
    """module -> the dit_fast modules it names in an import (any depth), an import_module("...") or a
    sys.modules["..."]. ``from package import name`` counts as importing the submodule ``name``, or the
    module the package's __init__ takes ``name`` from (``from dit_fast.ops import attention``:
    flash_attention). Parent packages, which Python initialises before any submodule, are not counted
    as imported by their submodules (each module of dit_fast.ops would otherwise import them all)."""
    modules = _modules(packages)
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    exported = {}  # (package, name) -> the module its __init__ imports name from
    for pkg in packages:
        for node in trees[pkg].body:
            if isinstance(node, ast.ImportFrom):
                source = _resolve_from(node.module or "", node, pkg)
                for alias in node.names:
                    exported[(pkg, alias.asname or alias.name)] = source
    graph = {}
    for name, tree in trees.items():
        package = name if name in packages else name.rpartition(".")[0]
        ancestors = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        targets = set()
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(node.module or "", node, package)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    names.append(sub if sub in modules else exported.get((base, alias.name), base))
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
                names = [_literal(node.args[0])]
            elif isinstance(node, ast.Subscript) and getattr(node.value, "attr", "") == "modules":
                names = [_literal(node.slice)]
            targets.update(n for n in names if n in modules and n != name and n not in ancestors)
        graph[name] = targets
    return graph


def reaches(graph, start: str, goal: str):
    """A path start -> ... -> goal through explicit imports, or None."""
    seen, stack = {start}, [[start]]
    while stack:
        path = stack.pop()
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == goal:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append(path + [nxt])
    return None


@pytest.mark.parametrize("lower, upper", [
    ("dit_fast.ops.attention_planner", "dit_fast.ops.flash_attention"),
    ("dit_fast.ops._attention_checks", "dit_fast.ops.flash_attention"),
    ("dit_fast.ops._attention_checks", "dit_fast.ops.attention_planner"),
    ("dit_fast.train_parallel", "dit_fast.train"),
    ("dit_fast.train_common", "dit_fast.train"),
    ("dit_fast.train_common", "dit_fast.train_parallel"),
])
def test_static_imports_run_one_way(lower, upper):
    graph = import_graph()
    assert upper in graph and lower in graph, "a module of the pair is missing: renamed?"
    assert reaches(graph, upper, lower) is not None or lower.endswith(("_checks", "_common")), \
        f"{upper} is expected to import {lower}"
    path = reaches(graph, lower, upper)
    assert path is None, f"{lower} imports {upper} again: {' -> '.join(path)}"


def test_the_graph_sees_lazy_and_re_exported_imports(tmp_path):
    """The checker itself: an import inside a function, one under TYPE_CHECKING, an import_module literal,
    a sys.modules lookup and a name the package re-exports must each count as an edge, or a cycle could
    hide there."""
    graph = import_graph()
    assert "dit_fast.train_parallel" in graph["dit_fast.train"]  # imported inside Trainer's methods only
    assert "dit_fast.ops" in graph["dit_fast.nn.adaln"]  # from dit_fast import ops
    package = tmp_path / "dit_fast"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ops" / "__init__.py").write_text("from dit_fast.ops.b import attention\n")
    (package / "ops" / "b.py").write_text("attention = None\n")
    (package / "ops" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
                                          "def f():\n    from dit_fast.ops import attention\n")
    (package / "ops" / "c.py").write_text("import sys\nsys.modules['dit_fast.ops.b']\n")
    (package / "ops" / "d.py").write_text("import importlib\nimportlib.import_module('dit_fast.ops.a')\n")
    graph = import_graph((("dit_fast", package),))
    assert graph["dit_fast.ops.a"] == {"dit_fast.ops.b", "dit_fast.ops.c"}
    assert graph["dit_fast.ops.c"] == {"dit_fast.ops.b"} and graph["dit_fast.ops.d"] == {"dit_fast.ops.a"}
    assert graph["dit_fast.ops"] == {"dit_fast.ops.b"}


RUNTIME = r'''
import importlib.machinery, sys, tempfile, types
from pathlib import Path

root = Path(sys.argv[1])
for name, folder in (("dit_fast", root / "dit_fast"), ("dit_fast.ops", root / "dit_fast" / "ops")):
    stub = types.ModuleType(name)  # the package without its __init__ (which imports every op family)
    stub.__path__ = [str(folder)]
    stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    sys.modules[name] = stub
sys.modules["dit_fast"].ops = sys.modules["dit_fast.ops"]

import torch
import dit_fast.ops.attention_planner as P

q = torch.randn(1, 12, 2, 16)
plan = P.attention_plan(q, q, q, (3, 2, 2), mode="spatial", rope="3d")  # CPU: the reference; the checks run
assert plan.impl == "reference", plan
P.flex_layout((1, 4, 4), (1, 2, 2), None, "cpu")  # the lazy imports of the Flex candidate
assert "dit_fast.ops.flash_attention" not in sys.modules, "the planner imported flash_attention"

import dit_fast.train_parallel as TP

with tempfile.TemporaryDirectory() as d:
    assert TP.sharded_root(d) is None  # the lazy imports of the sharded-run helpers
assert "dit_fast.train" not in sys.modules, "train_parallel imported dit_fast.train"
print("ok")
'''


def test_lower_modules_run_without_the_upper_ones():
    """A fresh process: the planner plans (CPU) without dit_fast.ops.flash_attention ever imported, and
    train_parallel's helpers run without dit_fast.train."""
    out = subprocess.run([sys.executable, "-c", RUNTIME, str(ROOT)], capture_output=True, text=True, timeout=240,
                         cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout[-2000:] + out.stderr[-4000:]
