#!/usr/bin/env python
"""Before / after table of two or more ``bench_propagation.py --json`` results (no test).

    python benchmarks/compare_propagation.py NAME=results/a.json [NAME=results/b.json ...]

One row per case/variant, one cell per prompt fraction with the Dice of each result in the
order given ("-" where a result lacks the entry); then the one-point and tumour rows, and per
result the count of entries below 0.93 among the entries all results share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List


def load(arg: str):
    name, _, path = arg.partition("=")
    return name, json.loads(Path(path).read_text())


def fmt(v) -> str:
    return "  -  " if v is None else f"{v:.3f}"


def main(argv: List[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    runs = [load(a) for a in argv]
    keys = sorted({k for _, r in runs for k, v in r.items() if "@" in k and isinstance(v, dict) and "dice" in v})
    rows: Dict[str, Dict[str, List]] = {}
    for k in keys:
        cv, _, f = k.partition("@")
        rows.setdefault(cv, {})[f] = [r.get(k, {}).get("dice") for _, r in runs]
    fracs = sorted({f for r in rows.values() for f in r})
    names = " -> ".join(n for n, _ in runs)
    print(f"liver Dice ({names})")
    print(f"{'case/variant':24s} " + " ".join(f"{int(round(100 * float(f))):>3d} %{'':{6 * len(runs) - 4}s}" for f in fracs))
    for cv, cells in rows.items():
        print(f"{cv:24s} " + " ".join(" ".join(fmt(v) for v in cells.get(f, [None] * len(runs))) + " " for f in fracs))
    extras = sorted({k for _, r in runs for k in r if "@" not in k and isinstance(r[k], dict) and "dice" in r[k]})
    for k in extras:
        print(f"{k:32s} " + " -> ".join(fmt(r.get(k, {}).get("dice")) for _, r in runs))
    shared = [k for k in keys if all(k in r and "dice" in r[k] for _, r in runs)]
    for name, r in runs:
        vals = [r[k]["dice"] for k in shared]
        print(f"{name}: {len(vals)} shared entries, below 0.93: {sum(v < 0.93 for v in vals)}, min {min(vals):.3f}, "
              f"mean {sum(vals) / len(vals):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
