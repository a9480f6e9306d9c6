#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (core library + Slicer Qt-free logic).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
venv="${SAMLIVERSEG_VENV:-$root/.venv}"
# Tests never download anything; keep any cache they make inside the build tree.
export SAMLIVERSEG_CACHE="${SAMLIVERSEG_CACHE:-$root/.cache/samliverseg}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$venv/bin/python" -m pytest "$@"
