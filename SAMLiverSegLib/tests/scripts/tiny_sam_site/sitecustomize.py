"""Registers a tiny random-weight SAM as Python starts, for processes a test launches but does not
write (the real ``samliverseg`` CLI started by the Slicer training panel's logic): this folder on
``PYTHONPATH`` and the spec in ``$SAMLIVERSEG_TEST_TINY_SAM`` (see ``libtest_helpers.tiny_sam_env``).
Does nothing where that variable is unset."""

import os
import sys
from pathlib import Path

_SPEC = os.environ.get("SAMLIVERSEG_TEST_TINY_SAM")
if _SPEC:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import libtest_helpers

    libtest_helpers.register_tiny_sam_json(_SPEC)
