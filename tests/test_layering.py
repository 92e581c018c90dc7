"""Package layering: sensor/ needs no torch, sensor/ and models/ have no import cycle, no private
name is imported across modules, and the package-level exports resolve."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sensor", "models")
CHECKED_DIRS = ("sensor", "models", "pipeline", "benchmarks", "tests")

# Run in a fresh interpreter: a finder that refuses torch (and all of torch.*) is installed
# first, then sensor and every submodule of it are imported.
_NO_TORCH = """
import importlib, pkgutil, sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test (import of {name})")
        return None

sys.meta_path.insert(0, BlockTorch())
import sensor
names = sorted(m.name for m in pkgutil.iter_modules(sensor.__path__, "sensor."))
for name in names:
    importlib.import_module(name)
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print(len(names), "modules")
"""


def test_sensor_imports_without_torch():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    count = int(proc.stdout.split()[0])
    expected = sum(1 for p in (ROOT / "sensor").glob("*.py") if p.name != "__init__.py")
    assert count == expected


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path) -> set[str]:
    """Every module that ``path`` imports, anywhere in the file (also inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{mod}.{alias.name}"
                out.add(sub if (ROOT / Path(*sub.split("."))).with_suffix(".py").exists() else mod)
    return out


def _graph(packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    files = [p for pkg in packages for p in (ROOT / pkg).rglob("*.py")]
    nodes = {_module_name(p): p for p in files}
    return {name: {m for m in _imported_modules(p) if m in nodes and m != name} for name, p in nodes.items()}


@pytest.mark.parametrize("packages", [PACKAGES, ("sensor", "models", "pipeline")], ids=["sensor+models", "all"])
def test_no_import_cycle(packages):
    graph = _graph(packages)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_layers_point_one_way():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("sensor"):
            assert not {d for d in deps if d.startswith("models")}, f"{name} imports models"
        if name in ("models.keyed", "models.keyed_ops", "models.keyed_layers"):
            assert "models.deform" not in deps, f"{name} imports models.deform"
    assert graph["models.deform"] & {"models.keyed", "models.keyed_layers"} == set()
    for path in (ROOT / "sensor").glob("*.py"):  # also lazy imports: sensor never needs torch
        assert not {m for m in _imported_modules(path) if m.split(".")[0] in ("torch", "models", "pipeline")}, \
            path.name


def _private_imports(path: Path) -> list[str]:
    """``from sensor|models... import _x`` (also relative, inside sensor and models) and ``mod._x``
    on a module alias of sensor or models."""
    found, aliases = [], set()
    inside = _module_name(path).split(".")[0] in PACKAGES
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom) and node.level and inside:
            found += [f"from {'.' * node.level}{node.module or ''} import {a.name}"
                      for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in PACKAGES:
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"from {node.module} import {alias.name}")
                sub = ROOT / Path(*node.module.split("."), alias.name)
                if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                    aliases.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    bad = {}
    for folder in CHECKED_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            hits = _private_imports(path)
            if hits:
                bad[str(path.relative_to(ROOT))] = hits
    assert not bad, bad


KEYED_EXPORTS = {  # models.keyed's public names before the split into keyed_ops / keyed_layers
    "KeyedAvgPool2d", "KeyedConv2d", "KeyedLinear", "KeyedMaxPool2d", "KeyedNet", "KeyedPreActBlock",
    "KeyedSequential", "MODES", "avg_pool_divisor", "conv_output_hw", "gather_columns", "gather_table", "keyed",
    "keyed_avg_pool2d", "keyed_conv2d", "keyed_max_pool2d", "layer_perm", "pool_output_hw", "position_table",
}


def test_models_keyed_still_exports_its_names():
    keyed = importlib.import_module("models.keyed")
    assert set(keyed.__all__) == KEYED_EXPORTS
    assert all(hasattr(keyed, name) for name in KEYED_EXPORTS)


@pytest.mark.parametrize("package", PACKAGES)
def test_package_exports_resolve(package):
    mod = importlib.import_module(package)
    assert mod.__all__ and all(hasattr(mod, name) for name in mod.__all__)
    for info in pkgutil.iter_modules(mod.__path__, f"{package}."):
        sub = importlib.import_module(info.name)
        for name in getattr(sub, "__all__", ()):
            assert hasattr(sub, name), f"{info.name}.__all__ names {name}, which it does not define"


def test_package_level_imports():
    from models import KeyedNet, build_model, keyed, load_checkpoint, save_checkpoint  # noqa: F401
    from sensor import (  # noqa: F401
        ConfigError,
        Key,
        PrivcamError,
        ProtectedFrame,
        ReadoutPermutation,
        Sensor,
        SensorConfig,
        load_key_file,
        read_raw,
        readout_permutation,
        render_photons,
        write_key_file,
        write_raw,
    )
