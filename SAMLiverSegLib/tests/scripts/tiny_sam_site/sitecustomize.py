"""Registers a tiny random-weight SAM as Python starts, for processes a test launches but does not
write (the real ``samliverseg`` CLI started by the Slicer training panel's logic): this folder on
``PYTHONPATH`` and the spec in ``$SAMLIVERSEG_TEST_TINY_SAM`` (see ``libtest_helpers.tiny_sam_env``).
Does nothing where that variable is unset."""

import json
import os
import sys
from pathlib import Path

_SPEC = os.environ.get("SAMLIVERSEG_TEST_TINY_SAM")
if _SPEC:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import libtest_helpers
    from samliverseg.models.build_sam import register_model

    register_model(libtest_helpers.tiny_sam_spec(**json.loads(_SPEC)), replace=True)
