"""The package's import structure: hf_rlion/kernels/ stands alone, and no two modules import each other.

Read from the source with ``ast`` (nothing is imported), counting every import statement, including
those inside functions: a function-level import only hides a circle until that function runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_rlion"
KERNELS = "hf_rlion.kernels"


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports (``from . import x`` counts as module ``x``)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            targets += [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for target in targets:
        while target and target not in modules:  # an attribute of a module: the module itself
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` as a list of modules (first = last), or ``[]`` if there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return []
        path.append(module)
        for imported in sorted(graph[module]):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return []


def test_the_graph_sees_imports_inside_functions():
    graph = _import_graph()
    assert f"{KERNELS}.cpu_rlion" in graph["hf_rlion._optimizer_base"]  # imported in _skip_nonfinite only
    assert f"{KERNELS}.triton_rlion" in graph["hf_rlion.rlion"]  # imported on first use of the device path
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_kernel_modules_import_nothing_from_the_package_outside_kernels():
    outside = {
        module: sorted(other for other in imported if not other.startswith(KERNELS))
        for module, imported in _import_graph().items()
        if module.startswith(KERNELS)
    }
    assert {module: others for module, others in outside.items() if others} == {}


def test_package_import_graph_has_no_cycle():
    assert _cycle(_import_graph()) == []


def test_c_and_triton_kernels_read_one_arctangent_and_one_block_size():
    from hf_rlion._optimizer_base import BLOCKSIZE
    from hf_rlion.kernels import cpu_rlion8bit

    header = (PACKAGE / "kernels" / "rlion_atan.h").read_text()
    for kernel in ("rlion_cpu.c", "rlion8bit_cpu.c"):
        source = (PACKAGE / "kernels" / kernel).read_text()
        assert '#include "rlion_atan.h"' in source and "ATAN_C0 =" not in source  # no copy of the coefficients
    assert "static inline float rlion_atanf(float a)" in header
    assert cpu_rlion8bit.BLOCKSIZE == BLOCKSIZE == 256


def test_triton_arctangent_parses_every_constant_of_the_c_header():
    pytest.importorskip("triton")
    from hf_rlion.kernels import triton_atan

    constants = triton_atan.header_constants()
    assert set(constants) == {f"ATAN_C{i}" for i in range(9)} | {"PIO2_HI", "PIO2_LO"}
    assert triton_atan.ATAN_C8.value == constants["ATAN_C8"] == float.fromhex("-0x1.d4dc8ap-10")
