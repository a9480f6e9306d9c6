"""The module panel without Qt (issue 11, items 1, 9 and 13): what opening the panel imports, what
``SAMLiverSeg.py`` may import at all, the widgets bound without parameterNodeWrapper, the epochs
check, and the model list read from ``samliverseg models --json``.

``SAMLiverSeg.py`` itself imports ``qt``/``ctk`` (it runs only inside Slicer): it is read here as
source (its syntax tree), never imported.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from slicer_test_helpers import MODULE_DIR

from samliverseg.core.errors import InputError
from SAMLiverSegLogic import module_logic
from SAMLiverSegLogic.constants import MODEL_CHOICES

MODULE_FILE = MODULE_DIR / "SAMLiverSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SAMLiverSeg.ui"
HEAVY = ("torch", "torchvision", "timm", "samliverseg.models", "samliverseg.modeling", "samliverseg.modeling3d",
         "samliverseg.interactive", "samliverseg.automatic", "samliverseg.training", "samliverseg.api",
         "samliverseg.service.server", "samliverseg.service.handlers")


def _heavy(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HEAVY)


def test_opening_the_panel_imports_nothing_heavy():
    """What the panel runs when it opens and when "Segment liver" is pressed, in a fresh Python:
    the dependency check, the model list (from a `samliverseg models --json` subprocess) and its
    choices, the worker settings and client, the run object; no torch, no model module."""
    code = r"""
import sys
import SAMLiverSegLogic, SAMLiverSegLogic.constants
from SAMLiverSegLogic import dependencies, module_logic, segment_writer, volume_nodes, worker_client
dependencies.dependencies_ready()
rows, cache = module_logic.model_rows()
choices = module_logic.model_choices(rows)
settings = module_logic.worker_settings("lite_medsam", "", "cpu", "torch", module_logic.window_spec("model"))
client = worker_client.shared_client(**settings)
assert client.proc is None
import json
print(json.dumps({"rows": [r.name for r in rows], "cache": cache, "choices": choices,
                  "modules": sorted(sys.modules)}))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m for m in got["modules"] if _heavy(m)] == []
    assert "lite_medsam" in got["rows"] and "sam_med3d" in got["rows"] and got["cache"]
    assert got["choices"][:len(MODEL_CHOICES)] == MODEL_CHOICES


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            for alias in node.names:
                yield f"{node.module}.{alias.name}"


def test_the_module_file_starts_no_thread_and_imports_no_model_code():
    """Slicer's process runs no Python thread and no model code (item 1 and 13): SAMLiverSeg.py
    imports neither threading nor any model module, at the top or inside a function."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    names = set(_imports(tree))
    assert not {n for n in names if n.split(".")[0] in ("threading", "concurrent", "_thread", "multiprocessing")}
    assert not {n for n in names if _heavy(n)}
    assert "SAMLiverSegLogic.effect_logic" not in names  # the in-process engine lives there
    called = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert not called & {"wait", "request", "wait_ready", "waitForBackgroundWork", "segment_in_process"}


def _parameter_names():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SAMLiverSegParameterNode")
    return {n.target.id: ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_line_edits_and_spin_boxes_are_bound_by_the_module():
    """Item 9: no QLineEdit / QSpinBox goes through parameterNodeWrapper (5.8 moves the cursor to the
    end on every keystroke and gives spin boxes the range +-2^31); they name their parameter in
    the module's own property, which the widget binds; the epochs range of the .ui starts at 1."""
    params = _parameter_names()
    ui = ET.parse(UI_FILE).getroot()
    manual = {}
    for widget in ui.iter("widget"):
        props = {p.get("name"): p for p in widget.findall("property")}
        if widget.get("class") in ("QLineEdit", "QSpinBox"):
            assert "SlicerParameterName" not in props, widget.get("name")
        if "SAMLiverSegParameterName" in props:
            manual[widget.get("name")] = props["SAMLiverSegParameterName"].find("string").text
            assert widget.get("class") in ("QLineEdit", "QSpinBox")
        if "SlicerParameterName" in props:
            assert props["SlicerParameterName"].find("string").text in params
    assert set(manual.values()) <= set(params)
    assert {"customWindow", "checkpoint", "trainRunFolder", "trainEpochs"} <= set(manual.values())
    assert params["trainEpochs"] == "int" and params["customWindow"] == "str"
    epochs = next(w for w in ui.iter("widget") if w.get("name") == "trainEpochsSpinBox")
    props = {p.get("name"): p for p in epochs.findall("property")}
    assert int(props["minimum"].find("number").text) == 1
    assert int(props["maximum"].find("number").text) < 2 ** 31 - 1
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert 'MANUAL_PARAMETER_PROPERTY = "SAMLiverSegParameterName"' in source


def test_epochs_below_one_are_refused_by_the_logic(tmp_path):
    from SAMLiverSegLogic.training_process import TrainingRequest

    (tmp_path / "labelled").mkdir()
    ok = TrainingRequest(labelled=str(tmp_path / "labelled"), run_folder=str(tmp_path / "run"), epochs=1)
    ok.validate()
    for bad in (0, -3):
        with pytest.raises(InputError, match="epochs must be at least 1"):
            TrainingRequest(labelled=str(tmp_path / "labelled"), run_folder=str(tmp_path / "run"), epochs=bad).validate()


def test_model_list_from_the_json_of_samliverseg_models():
    text = json.dumps({"weights_cache": "/cache", "models_folder": "/cache/models", "models": [
        {"name": "lite_medsam", "family": "sam2d", "interactive": True, "present": True, "path": "/w/l.pth",
         "where": "", "trained": False, "description": "LiteMedSAM"},
        {"name": "sam_vit_b", "family": "sam2d", "interactive": True, "present": False, "path": None,
         "where": "download it", "trained": False},
        {"name": "my-decoder", "family": "decoder", "interactive": True, "present": True, "path": "/m/model.pth",
         "trained": True},
        {"name": "my-unet", "family": "unet", "interactive": False, "present": True, "path": "/u/model.pth",
         "trained": True},
        {"name": "broken", "family": "decoder", "interactive": True, "present": False, "trained": True}]})
    rows, cache = module_logic.parse_models_json(text)
    assert cache == "/cache"
    assert [(r.name, r.present, r.where) for r in rows[:2]] == [("lite_medsam", True, "/w/l.pth"),
                                                                ("sam_vit_b", False, "missing: download it")]
    assert module_logic.model_choices(rows) == MODEL_CHOICES + ["my-decoder"]
    for bad in ("", "not json", "{}", json.dumps({"models": [{"present": True}], "weights_cache": "x"})):
        with pytest.raises(InputError, match="could not read the model list") as err:
            module_logic.parse_models_json(bad)
        assert "\n" not in str(err.value)


def test_model_rows_says_why_when_the_library_cannot_list(tmp_path):
    rows, message = module_logic.model_rows(python=str(tmp_path / "no-python"))
    assert rows == [] and message.startswith("(could not list the models")
    rows, message = module_logic.model_rows(python="/bin/false")
    assert rows == [] and "could not list the models" in message


def test_worker_settings_are_the_shared_client_keys():
    from SAMLiverSegLogic import worker_client

    s = module_logic.worker_settings("lite_medsam", "", "cpu", "torch", None, python=sys.executable)
    assert set(s) <= set(worker_client.SHARED_SETTINGS) and s["checkpoint"] is None and s["window"] is None
    worker_client.shutdown_shared_client()
    a = worker_client.shared_client(**s)
    try:
        assert worker_client.shared_client(**module_logic.worker_settings("lite_medsam", None, "cpu", "torch", "",
                                                                          python=sys.executable)) is a
    finally:
        worker_client.shutdown_shared_client()
