"""Register a tiny random-weight SAM, then run ``samliverseg.training.train`` or the ``samliverseg``
command line in this process (the subprocess and torchrun tests; see ``libtest_helpers.tiny_sam_command``).

usage: run_with_tiny_sam.py train|cli SPEC_JSON [ARGS...]
SPEC_JSON: ``libtest_helpers.tiny_sam_json`` (name, arch, other ModelSpec fields, as ``tiny_sam_spec`` takes).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import libtest_helpers  # noqa: E402


def main(argv):
    entry = argv[0]
    libtest_helpers.register_tiny_sam_json(argv[1])
    if entry == "train":
        from samliverseg.training.train import main as run
    elif entry == "cli":
        from samliverseg.cli.commands import main as run
    else:
        raise SystemExit(f"unknown entry {entry!r} (train or cli)")
    return run(argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
