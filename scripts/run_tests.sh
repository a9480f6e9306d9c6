#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite (core library + Slicer Qt-free logic).
#
# Then, when the first run passed and no arguments narrowed it, the Slicer logic tests
# (SAMLiverSeg/Testing/Python, without the slow ones) run a second time against an older
# slicer-core, whose APIs differ (e.g. 5.11's slicer.util.pip_install takes one argument):
# SAMLIVERSEG_SLICER_CORE_2 (default 5.11.0.6; empty: skip) is installed with its exact vtk into
# $venv/slicer-core-VERSION (pip --target, --no-deps) and put first on PYTHONPATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
venv="${SAMLIVERSEG_VENV:-$root/.venv}"
# Tests never download anything; keep any cache they make inside the build tree.
export SAMLIVERSEG_CACHE="${SAMLIVERSEG_CACHE:-$root/.cache/samliverseg}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"$venv/bin/python" -m pytest "$@"

second="${SAMLIVERSEG_SLICER_CORE_2-5.11.0.6}"
narrowed=0
for a in "$@"; do case "$a" in -*) ;; *) narrowed=1 ;; esac; done
if [ -z "$second" ] || [ "$narrowed" = 1 ]; then exit 0; fi
target="$venv/slicer-core-$second"
if [ ! -f "$target/.complete" ]; then
  echo "run_tests: installing slicer-core $second (with its vtk) into $target" >&2
  rm -rf "$target"
  pip_t=("$venv/bin/python" -m pip install --no-deps --disable-pip-version-check -q --target "$target")
  # its compiled modules link against one exact vtk (Requires-Dist: vtk==X): install that one beside it
  if ! { "${pip_t[@]}" "slicer-core==$second" &&
         vtk_pin="$(sed -n 's/^Requires-Dist: \(vtk==[^ ;]*\).*/\1/p' "$target"/slicer_core-*.dist-info/METADATA | head -1)" &&
         { [ -z "$vtk_pin" ] || "${pip_t[@]}" "$vtk_pin"; }; }; then
    rm -rf "$target"
    echo "run_tests: WARNING: slicer-core $second could not be installed (no package index?): its run is SKIPPED" >&2
    exit 0
  fi
  touch "$target/.complete"
fi
echo "run_tests: Slicer logic tests against slicer-core $second" >&2
start=$(date +%s)
PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" -m pytest "$@" -m "not slow" \
    SAMLiverSeg/Testing/Python --ignore=SAMLiverSeg/Testing/Python/test_python39.py
echo "run_tests: slicer-core $second run took $(( $(date +%s) - start )) s" >&2
