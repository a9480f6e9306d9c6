"""Static checks of the extension: CMake lists, the .ui file, the catalog entry, icons, imports."""

import ast
import json
import py_compile
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from slicer_test_helpers import MODULE_DIR, REPO_ROOT

MODULE_PY = MODULE_DIR / "SAMLiverSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SAMLiverSeg.ui"
EFFECT_PY = MODULE_DIR / "SegmentEditorSegmentAnything" / "SegmentEditorEffect.py"
LOGIC_DIR = MODULE_DIR / "SAMLiverSegLogic"
RESOURCE_SUFFIXES = {".png", ".svg", ".jpg", ".ui", ".json", ".txt", ".qrc"}


def cmake_list(text, var):
    m = re.search(r"set\(\s*" + var + r"\s+(.*?)\)", text, re.S)
    assert m, f"{var} is not set"
    return [ln.strip().replace("${MODULE_NAME}", "SAMLiverSeg") for ln in m.group(1).split("\n")
            if ln.strip() and not ln.strip().startswith("#")]


def module_files():
    out = []
    for p in MODULE_DIR.rglob("*"):
        rel = p.relative_to(MODULE_DIR)
        if not p.is_file() or rel.parts[0] == "Testing" or "__pycache__" in rel.parts or p.name == "CMakeLists.txt":
            continue
        out.append(rel.as_posix())
    return out


def test_every_python_and_resource_file_is_listed_in_cmake():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    files = module_files()
    py = sorted(f for f in files if f.endswith(".py"))
    res = sorted(f for f in files if Path(f).suffix in RESOURCE_SUFFIXES)
    assert not set(py) - set(scripts), f"Python files missing from MODULE_PYTHON_SCRIPTS: {sorted(set(py) - set(scripts))}"
    assert not set(res) - set(resources), f"resources missing from MODULE_PYTHON_RESOURCES: {sorted(set(res) - set(resources))}"
    for listed in scripts + resources:
        assert (MODULE_DIR / listed).is_file(), f"{listed} is listed in CMake but does not exist"
    unknown = set(files) - set(py) - set(res)
    assert not unknown, f"files of unknown kind under SAMLiverSeg/ (list them or remove them): {sorted(unknown)}"


def test_module_cmake_builds_scripted_module_and_registers_the_slicer_test():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "NAME ${MODULE_NAME}" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").is_file()
    assert "SAMLiverSegLib" in text  # the core library is bundled beside the module
    src = MODULE_PY.read_text()
    assert re.search(r"class SAMLiverSegTest\(ScriptedLoadableModuleTest\)", src)
    assert "def runTest(self)" in src


def test_top_level_cmake_has_the_extension_metadata():
    text = (REPO_ROOT / "CMakeLists.txt").read_text()
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({var}\s+"[^"]+"', text), var
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"Segmentation"\)', text)
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"PyTorch"\)', text)
    assert "add_subdirectory(SAMLiverSeg)" in text
    assert "find_package(Slicer REQUIRED)" in text and "Slicer_EXTENSION_CPACK" in text


#: Slicer/ExtensionsIndex validates entries with this schema (schemas/...-v1.0.1.json, check-jsonschema).
CATALOG_SCHEMA_V101 = {
    "required": ["$schema", "category", "scm_url"],
    "properties": {
        "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
        "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int,
    },
    "enums": {"scm_type": ["git", "local"]},
    "ranges": {"tier": (1, 5)},
}


def test_extensions_index_catalog_entry():
    entry = json.loads((REPO_ROOT / "SAMLiverSeg.json").read_text())
    schema = CATALOG_SCHEMA_V101
    for key in schema["required"]:
        assert key in entry, key
    extra = set(entry) - set(schema["properties"])
    assert not extra, f"additionalProperties are not allowed: {extra}"
    for key, value in entry.items():
        assert isinstance(value, schema["properties"][key]), key
        if key in schema["enums"]:
            assert value in schema["enums"][key], key
        if key in schema["ranges"]:
            assert schema["ranges"][key][0] <= value <= schema["ranges"][key][1], key
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"' + entry["category"] + '"', cmake)


def test_catalog_entry_is_formatted_as_the_index_lint_wants():
    """ExtensionsIndex's pre-commit: prettier (2-space indent, every array wrapped one item per
    line: prettier-plugin-multiline-arrays with multilineArraysWrapThreshold 0), a final newline,
    no tabs, no trailing whitespace."""
    text = (REPO_ROOT / "SAMLiverSeg.json").read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"
    assert "\t" not in text and all(ln == ln.rstrip() for ln in text.splitlines())


RAW_URL = re.compile(r"https://raw\.githubusercontent\.com/SAMLiverSeg/SlicerSAMLiverSeg/main/(\S+)")


def test_catalog_urls_point_at_files_in_the_repository():
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    for var in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        urls = re.search(rf'set\({var}\s+"([^"]+)"', cmake).group(1).split()
        assert urls, var
        for url in urls:
            m = RAW_URL.fullmatch(url)
            assert m, f"{var}: {url} is not a raw URL of this repository's main branch"
            path = REPO_ROOT / m.group(1)
            assert path.is_file(), f"{var}: {m.group(1)} is not in the repository"
            width, height = png_size(path)
            assert path.stat().st_size < 1024 * 1024 and width >= 128 and height >= 128
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE\s+"([^"#]+)', cmake).group(1)
    entry = json.loads((REPO_ROOT / "SAMLiverSeg.json").read_text())
    assert entry["scm_url"].rstrip("/").removesuffix(".git") == homepage.rstrip("/")


def test_license_file_is_the_declared_license():
    text = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert 'license = { text = "Apache-2.0" }' in (REPO_ROOT / "SAMLiverSegLib" / "pyproject.toml").read_text()


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("path,size", [
    (REPO_ROOT / "Resources" / "SAMLiverSeg.png", (128, 128)),
    (MODULE_DIR / "Resources" / "Icons" / "SAMLiverSeg.png", (128, 128)),
    (MODULE_DIR / "SegmentEditorSegmentAnything" / "SegmentEditorEffect.png", (32, 32)),
])
def test_icons_are_real_pngs(path, size):
    assert png_size(path) == size


# -- the .ui file --------------------------------------------------------------------------------

def ui_tree():
    return ET.parse(UI_FILE).getroot()


def ui_widgets():
    return {w.get("name"): w.get("class") for w in ui_tree().iter("widget")}


def test_every_self_ui_name_used_in_code_exists_in_the_ui_file():
    names = set(ui_widgets())
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_PY.read_text()))
    assert used, "no self.ui.<name> found: the test would prove nothing"
    missing = used - names
    assert not missing, f"self.ui names used in SAMLiverSeg.py but absent from the .ui file: {sorted(missing)}"


def parameter_node_fields():
    tree = ast.parse(MODULE_PY.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in SAMLiverSeg.py")


def test_ui_parameter_bindings_match_the_parameter_node():
    fields = parameter_node_fields()
    bound = {}
    for w in ui_tree().iter("widget"):
        for prop in w.findall("property"):
            # SAMLiverSegParameterName: bound by the module itself (line edits on editingFinished and the
            # epochs spin box: parameterNodeWrapper's connectors misbehave for them on Slicer 5.8)
            if prop.get("name") in ("SlicerParameterName", "SAMLiverSegParameterName"):
                bound[prop.find("string").text] = (w.get("name"), w.get("class"))
    assert set(bound) == set(fields), (f"parameters without a widget: {set(fields) - set(bound)}; "
                                       f"widgets bound to unknown parameters: {set(bound) - set(fields)}")
    # the widget class must be one the parameterNodeWrapper GUI connectors accept for the type
    for name, (widget, cls) in bound.items():
        t = fields[name]
        if t.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", (name, cls)
        elif "Choice" in t:
            assert cls == "QComboBox", (name, cls)
        elif t == "bool":
            assert cls in ("QCheckBox", "QPushButton"), (name, cls)
        elif t == "str":
            assert cls in ("QLineEdit", "QTextEdit"), (name, cls)
        elif t == "int":
            assert cls == "QSpinBox", (name, cls)


def test_ui_file_is_well_formed_for_slicer():
    root = ui_tree()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "SAMLiverSeg"
    declared = {c.find("class").text for c in root.iter("customwidget")}
    qt_builtin = {c for c in ui_widgets().values() if c.startswith("Q")}
    assert set(ui_widgets().values()) - qt_builtin <= declared, "undeclared custom widget classes"
    combos = [n for n, c in ui_widgets().items() if c == "qMRMLNodeComboBox"]
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert set(combos) == connected, "every qMRMLNodeComboBox needs the mrmlSceneChanged -> setMRMLScene connection"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


# -- Python sources ------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [MODULE_PY, EFFECT_PY, MODULE_DIR / "SegmentEditorSegmentAnything" / "__init__.py"])
def test_qt_sources_compile(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


FORBIDDEN_IN_LOGIC = re.compile(r"^\s*(import|from)\s+(qt|ctk|PythonQt|slicer\.ScriptedLoadableModule)\b", re.M)


@pytest.mark.parametrize("path", sorted(LOGIC_DIR.glob("*.py")), ids=lambda p: p.name)
def test_logic_package_is_qt_free(path):
    src = path.read_text()
    assert not FORBIDDEN_IN_LOGIC.search(src), f"{path.name} imports Qt"
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
            assert node.attr not in ("app", "mrmlScene", "modules"), \
                f"{path.name} uses slicer.{node.attr} (needs the application; pass the scene in)"


def test_logic_package_imports_with_slicer_core_only():
    import importlib

    for path in sorted(LOGIC_DIR.glob("*.py")):
        importlib.import_module(f"SAMLiverSegLogic.{path.stem}" if path.stem != "__init__" else "SAMLiverSegLogic")


def test_module_file_imports_nothing_heavy_at_startup():
    """SAMLiverSeg.py is imported when Slicer starts: no torch / samliverseg at module level."""
    tree = ast.parse(MODULE_PY.read_text())
    top_imports = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_imports.add(node.module)
    assert not {m for m in top_imports if m.split(".")[0] in ("torch", "samliverseg", "numpy", "SimpleITK")}
    assert {m for m in top_imports if m.startswith("SAMLiverSegLogic")} <= {"SAMLiverSegLogic", "SAMLiverSegLogic.constants"}


def test_versions_and_choices_agree_with_the_library():
    from samliverseg import __version__
    from samliverseg.models.build_sam import MODEL_REGISTRY
    from samliverseg.core.windowing import PRESETS
    from SAMLiverSegLogic import MODULE_VERSION
    from SAMLiverSegLogic.constants import MODEL_CHOICES, WINDOW_CHOICES

    assert MODULE_VERSION == __version__
    assert set(MODEL_CHOICES) <= set(MODEL_REGISTRY), set(MODEL_CHOICES) - set(MODEL_REGISTRY)
    assert set(WINDOW_CHOICES) - {"model", "custom"} <= set(PRESETS)


def test_backend_choices_are_the_library_backends():
    from samliverseg.interactive.backends import BACKENDS
    from SAMLiverSegLogic.constants import BACKEND_CHOICES
    from SAMLiverSegLogic.effect_logic import EngineSettings

    assert list(BACKEND_CHOICES) == list(BACKENDS)
    assert EngineSettings().backend in BACKEND_CHOICES


def test_decoder_precision_choices_are_the_librarys():
    from samliverseg.interactive.backends import DECODER_PRECISIONS
    from SAMLiverSegLogic.constants import DECODER_PRECISION_CHOICES
    from SAMLiverSegLogic.effect_logic import PARAMETER_DEFAULTS, EngineSettings

    assert list(DECODER_PRECISION_CHOICES) == list(DECODER_PRECISIONS)
    assert EngineSettings().decoder_precision == PARAMETER_DEFAULTS["DecoderPrecision"] == DECODER_PRECISION_CHOICES[0]
    assert 'self.parameterValue("DecoderPrecision")' in EFFECT_PY.read_text()


def test_effect_registration_points_at_the_effect_file():
    src = MODULE_PY.read_text()
    assert '"SegmentEditorSegmentAnything", "SegmentEditorEffect.py"' in src
    assert 'slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)' in src
    effect = EFFECT_PY.read_text()
    assert 'scriptedEffect.name = "Segment Anything"' in effect
    from SAMLiverSegLogic.constants import EFFECT_NAME

    assert EFFECT_NAME == "Segment Anything"
