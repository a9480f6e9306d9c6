"""Slicer 5.8 runs Python 3.9: vermin checks that the module and the library need nothing newer.

``vermin`` (a test requirement, installed by scripts/setup_env.sh) reads the sources' syntax and
the standard-library names they use; ``from __future__ import annotations`` keeps ``X | Y`` in
annotations legal. torch's ``Tensor.long()`` is reported as Python 2's ``long``: a note, not a
violation (the exit status stays 0).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from slicer_test_helpers import MODULE_DIR, REPO_ROOT

vermin = pytest.importorskip("vermin", reason="vermin is installed by scripts/setup_env.sh (requirements.txt)")

VERMIN = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())"]
ARGS = ["--target=3.9-", "--no-tips", "--violations"]


def run_vermin(*paths):
    return subprocess.run(VERMIN + ARGS + [str(p) for p in paths], capture_output=True, text=True, timeout=600)


def test_module_and_library_run_on_python_3_9():
    done = run_vermin(MODULE_DIR, REPO_ROOT / "SAMLiverSegLib" / "samliverseg")
    assert done.returncode == 0, done.stdout + done.stderr


def test_vermin_reports_a_python_3_10_construct(tmp_path):
    bad = tmp_path / "newer.py"
    bad.write_text(textwrap.dedent("""
        def f(x):
            match x:
                case 1:
                    return "one"
            return None
    """))
    done = run_vermin(bad)
    assert done.returncode != 0 and "3.10" in done.stdout + done.stderr
