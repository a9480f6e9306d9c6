"""The architecture, checked: layers point one way, no import circles, no borrowed private names.

Reads every module's source (imports at any depth, also inside functions) of ``samliverseg``
and of the Qt-free Slicer logic ``SAMLiverSegLogic``; nothing is imported.

Layers of ``samliverseg``, bottom up (a module may import its own layer and those below):

0 ``core``  1 ``io``  2 ``modeling``, ``modeling3d`` (pure ``nn.Module``s: themselves and ``core``
only)  3 ``models``  4 ``interactive``, ``automatic``  5 ``training``  6 ``api``  7 ``cli``, ``demo``, ``service`` (the inference worker).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
LIB = REPO / "SAMLiverSegLib" / "samliverseg"
LOGIC = REPO / "SAMLiverSeg" / "SAMLiverSegLogic"

LAYERS = {"core": 0, "io": 1, "modeling": 2, "modeling3d": 2, "models": 3, "interactive": 4, "automatic": 4,
          "training": 5, "api": 6, "cli": 7, "demo": 7, "service": 7}
#: Old import paths kept for one release (each one line: sys.modules alias to the new module).
COMPAT = {"samliverseg.volume", "samliverseg.engine", "samliverseg.prompts", "samliverseg.uncertainty",
          "samliverseg.engine3d"}


def module_files(root: Path, package: str) -> Dict[str, Path]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).with_suffix("").parts
        if rel[-1] == "__init__":
            rel = rel[:-1]
        out[".".join((package,) + rel)] = p
    return out


def imports_of(name: str, path: Path, known: Set[str]) -> List[Tuple[str, str, int]]:
    """(imported module, imported attribute or '', line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                found.append((a.name, "", node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.append((sub, "", node.lineno) if sub in known else (mod, a.name, node.lineno))
    return found


def private_attribute_uses(path: Path, known: Set[str], name: str) -> List[str]:
    """``module._name`` where ``module`` is bound by ``import``/``from ... import module``."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in known:
                    bound[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                if f"{mod}.{a.name}" in known:
                    bound[a.asname or a.name] = f"{mod}.{a.name}"
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{path.name}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    return bad


def graph(root: Path, package: str):
    files = module_files(root, package)
    known = set(files)
    edges = {}
    for name, path in files.items():
        edges[name] = imports_of(name, path, known)
    return files, known, edges


def cycles(nodes: Set[str], adj: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def owner(mod: str, known: Set[str]) -> str:
    """The known module that ``mod`` names or lies in (``a.b.c`` -> ``a.b`` if only that is known)."""
    while mod and mod not in known:
        mod = mod.rpartition(".")[0]
    return mod


TREES = [(LIB, "samliverseg"), (LOGIC, "SAMLiverSegLogic")]


@pytest.mark.parametrize("root,package", TREES, ids=["samliverseg", "SAMLiverSegLogic"])
def test_no_import_circles(root, package):
    files, known, edges = graph(root, package)
    adj = {}
    for name, imps in edges.items():
        for mod, _attr, _line in imps:
            target = owner(mod, known)
            # a package's __init__ is imported by everything below it: not an edge of interest
            if target and target != name and not name.startswith(target + "."):
                adj.setdefault(name, set()).add(target)
    found = cycles(set(files), adj)
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("root,package", TREES, ids=["samliverseg", "SAMLiverSegLogic"])
def test_no_private_names_of_other_modules(root, package):
    files, known, edges = graph(root, package)
    lib_files, lib_known, _ = graph(LIB, "samliverseg")
    all_known = known | lib_known
    bad = []
    for name, imps in edges.items():
        for mod, attr, line in imps:
            if attr.startswith("_") and not attr.startswith("__") and owner(mod, all_known) and mod != name:
                bad.append(f"{name}:{line} imports {mod}.{attr}")
        bad += private_attribute_uses(files[name], all_known, name)
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def layer_of(name: str):
    parts = name.split(".")
    if len(parts) < 2 or name in COMPAT:
        return None
    return LAYERS.get(parts[1])


def test_layers_point_down():
    files, known, edges = graph(LIB, "samliverseg")
    unplaced = [n for n in files if n.count(".") >= 1 and layer_of(n) is None and n not in COMPAT
                and n != "samliverseg.__main__"]
    assert not unplaced, f"modules outside every layer (place them in a folder of LAYERS): {unplaced}"
    bad = []
    for name, imps in edges.items():
        mine = layer_of(name)
        if mine is None:
            continue
        for mod, _attr, line in imps:
            target = owner(mod, known)
            if not target or target == "samliverseg":
                continue
            if target in COMPAT:
                bad.append(f"{name}:{line} imports the old path {target}")
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                bad.append(f"{name}:{line} (layer {mine}) imports {target} (layer {theirs})")
    assert not bad, "imports that point up:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", ["modeling", "modeling3d"])
def test_modeling_is_pure(folder):
    """``modeling``/``modeling3d`` hold nn.Modules: they import themselves, ``core`` and third-party
    numerics only (no file IO layers, no registry, no training)."""
    files, known, edges = graph(LIB, "samliverseg")
    bad = []
    for name, imps in edges.items():
        if not name.startswith(f"samliverseg.{folder}"):
            continue
        for mod, _attr, line in imps:
            if mod.startswith("samliverseg") and not mod.startswith(("samliverseg.core", "samliverseg.modeling")):
                bad.append(f"{name}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("old", sorted(COMPAT))
def test_old_import_paths_still_work(old):
    """README's library API of the previous release: each old path is the new module itself."""
    import importlib

    module = importlib.import_module(old)
    assert module.__name__.startswith("samliverseg.") and module.__name__ != old
    assert importlib.import_module(old) is importlib.import_module(module.__name__)


def test_readme_api_through_old_paths():
    from samliverseg.engine import PromptEngine
    from samliverseg.engine3d import Sam3DEngine
    from samliverseg.interactive.engine import PromptEngine as new_engine
    from samliverseg.prompts import Prompts, SliceBox
    from samliverseg.uncertainty import ensemble_uncertainty
    from samliverseg.volume import read_volume

    assert PromptEngine is new_engine and callable(read_volume) and callable(ensemble_uncertainty)
    assert Sam3DEngine.__module__ == "samliverseg.interactive.engine3d"
    assert SliceBox.axial(0, 0, 1, 1, 0) is not None and Prompts is not None
