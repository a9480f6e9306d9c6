#!/usr/bin/env bash
# Sets up .venv if needed, then runs the demo on the embedded default model (LiteMedSAM):
# a synthetic abdominal CT phantom, liver + tumour from one box each, 3D propagation, and
# output/demo/ with the segmentation, a PNG overlay and a report with Dice against the truth.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
venv="${SAMLIVERSEG_VENV:-$root/.venv}"
exec "$venv/bin/samliverseg" demo "$@"
