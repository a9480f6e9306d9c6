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


@pytest.fixture(scope="session", autouse=True)
def _user_models_in_a_temporary_folder(tmp_path_factory):
    """Models registered by training tests never reach the developer's real models folder."""
    old = os.environ.get("SAMLIVERSEG_MODELS")
    os.environ["SAMLIVERSEG_MODELS"] = str(tmp_path_factory.mktemp("user_models"))
    yield
    if old is None:
        os.environ.pop("SAMLIVERSEG_MODELS", None)
    else:
        os.environ["SAMLIVERSEG_MODELS"] = old


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
