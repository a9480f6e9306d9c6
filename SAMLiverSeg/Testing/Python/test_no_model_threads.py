"""Slicer's process runs no model code and starts no thread (issue 11, item 1).

Python threads in Slicer's process barely run (its main thread holds the GIL while Qt idles), so
model work goes to the inference worker process and the GUI is woken by Qt. This reads (``ast``,
nothing is imported) every ``.py`` of ``SAMLiverSeg/`` outside ``Testing/`` and fails on

* threads: ``threading`` (``Thread``, ``Timer``), a class derived from ``Thread``/``QThread``,
  ``concurrent.futures`` executors, ``_thread``, ``QThread``, ``multiprocessing`` thread pools;
* model code, imported at module level or inside functions (also through ``importlib``):
  ``torch`` and the model layers of ``samliverseg`` (``interactive``, ``automatic``, ``modeling``,
  ``modeling3d``, ``models``, ``api``, ``training``, the worker's ``service.server``/``handlers``,
  and the old aliases ``engine``, ``engine3d``, ``uncertainty``),

except the imports allowed below, each with its reason; a subprocess checks that importing the
allowed modules loads neither torch nor model code.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

from slicer_test_helpers import MODULE_DIR, REPO_ROOT

SLICER_DIR = REPO_ROOT / "SAMLiverSeg"

MODEL_MODULES = ("torch", "samliverseg.interactive", "samliverseg.automatic", "samliverseg.modeling",
                 "samliverseg.modeling3d", "samliverseg.models", "samliverseg.api", "samliverseg.training",
                 "samliverseg.service.server", "samliverseg.service.handlers", "samliverseg.engine",
                 "samliverseg.engine3d", "samliverseg.uncertainty")
THREAD_MODULES = ("threading", "_thread", "concurrent.futures", "multiprocessing.pool", "multiprocessing.dummy")
THREAD_NAMES = ("Thread", "QThread", "Timer", "ThreadPoolExecutor", "ProcessPoolExecutor", "ThreadPool",
                "start_new_thread", "QThreadPool", "QRunnable")

#: (file relative to SAMLiverSeg/, imported module): why it is no model code.
ALLOWED_IMPORTS = {
    ("SAMLiverSegLogic/worker_client.py", "samliverseg.service.protocol"):
        "the worker protocol's framing, constants and .npy arrays (json and numpy only)",
    ("SAMLiverSegLogic/training_process.py", "samliverseg.models.kinds"):
        "the names of the trainable model kinds (constants) for the training panel's command lines",
}

#: Known violations in files other helpers are changing now, each to be removed when merged.


def _is(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def violations(source: str, filename: str = "<source>") -> List[Tuple[int, str, str]]:
    """(line, what, module or name) for every thread or model-code use in ``source``."""
    out: List[Tuple[int, str, str]] = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        modules: List[str] = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from pkg.mod import name": pkg.mod; "from pkg import mod": pkg.mod
            modules = [node.module] if _is(node.module, THREAD_MODULES + MODEL_MODULES) else \
                [f"{node.module}.{a.name}" for a in node.names]
            if any(a.name in THREAD_NAMES for a in node.names) and not _is(node.module, THREAD_MODULES):
                out.append((node.lineno, "thread", node.module))  # e.g. from qt import QThread
        elif isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] in ("import_module", "__import__") \
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            modules = [node.args[0].value]
        for m in modules:
            if _is(m, THREAD_MODULES):
                out.append((node.lineno, "thread", m))
            elif _is(m, MODEL_MODULES):
                out.append((node.lineno, "model", m))
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if _dotted(base).split(".")[-1] in ("Thread", "QThread"):
                    out.append((node.lineno, "thread", _dotted(base)))
        if isinstance(node, ast.Attribute) and node.attr in ("QThread", "QThreadPool", "QRunnable"):
            out.append((node.lineno, "thread", _dotted(node)))
    return out


def slicer_sources():
    for path in sorted(SLICER_DIR.rglob("*.py")):
        rel = path.relative_to(SLICER_DIR).as_posix()
        if not rel.startswith("Testing/"):
            yield rel, path


def test_the_scanner_finds_every_kind_of_thread_and_model_import():
    src = '''
import threading
import _thread
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.pool import ThreadPool
import qt
from qt import QThread
class Worker(threading.Thread):
    pass
class QtWorker(qt.QThread):
    pass
def later():
    import torch
    from samliverseg.api import open_model
    from samliverseg import interactive
    import importlib
    importlib.import_module("samliverseg.models.registry")
    from samliverseg.core.errors import InputError   # fine: core
    from samliverseg.service import protocol          # fine: pure framing
'''
    found = {(what, name) for _, what, name in violations(src)}
    assert ("thread", "threading") in found and ("thread", "_thread") in found
    assert ("thread", "concurrent.futures") in found and ("thread", "multiprocessing.pool") in found
    assert ("thread", "qt") in found and ("thread", "threading.Thread") in found and ("thread", "qt.QThread") in found
    assert ("model", "torch") in found and ("model", "samliverseg.api") in found
    assert ("model", "samliverseg.interactive") in found and ("model", "samliverseg.models.registry") in found
    assert not any("core" in name or "protocol" in name for _, name in found)


def test_no_module_of_the_slicer_extension_starts_threads_or_imports_model_code():
    bad = []
    for rel, path in slicer_sources():
        for line, what, name in violations(path.read_text(encoding="utf-8"), str(path)):
            if (rel, name) in ALLOWED_IMPORTS:
                continue
            bad.append(f"{rel}:{line}: {what}: {name}")
    assert not bad, "Slicer's process must start no thread and import no model code:\n" + "\n".join(bad)


def test_the_allowed_imports_load_neither_torch_nor_model_code():
    modules = sorted({m for _, m in ALLOWED_IMPORTS})
    parents = sorted({m.rsplit(".", n)[0] for m in modules for n in range(1, m.count(".") + 1)})
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            f"bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or "
            f"(m.startswith({MODEL_MODULES[1:]!r}) and m not in {modules + parents!r})]\n"
            "print(sorted(bad))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
