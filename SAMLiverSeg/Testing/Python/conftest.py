"""Fixtures for the Qt-free logic tests: a real slicer-core MRML scene, volumes of several geometries.

No mocks: ``slicer`` here is the slicer-core wheel (Slicer's MRML, Segmentations and Segment
Editor logic without Qt), the same C++ classes the application uses. Helpers live in
``slicer_test_helpers`` (which also puts ``SAMLiverSeg/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slicer_test_helpers import GEOMETRIES, REPO_ROOT  # noqa: E402

os.environ.setdefault("SAMLIVERSEG_CACHE", str(REPO_ROOT / ".cache" / "samliverseg"))

import slicer  # noqa: E402  (slicer-core)

from SAMLiverSegLogic import volume_nodes  # noqa: E402


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(s)
    volume_nodes.ensure_segmentation_converters()
    yield s
    s.Clear(1)


@pytest.fixture(params=list(GEOMETRIES))
def geometry_case(request):
    return request.param, GEOMETRIES[request.param]


@pytest.fixture(scope="module")
def client():
    """A real inference worker (LiteMedSAM, CPU, torch: the tests compare with the in-process
    torch engine; one test needs a worker busy embedding for longer than its shutdown timeout)."""
    from SAMLiverSegLogic.worker_client import WorkerClient

    with WorkerClient(device="cpu", backend="torch") as c:
        yield c


@pytest.fixture(scope="module")
def engine():
    """The in-process LiteMedSAM engine (CPU, torch): the reference the worker paths must equal."""
    from samliverseg.interactive.engine import PromptEngine

    return PromptEngine(model="lite_medsam", device="cpu", backend="torch")
