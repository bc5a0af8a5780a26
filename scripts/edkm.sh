#!/usr/bin/env bash
# Runs the edkm command line inside the project's virtual environment, creating it first if
# needed (scripts/setup.sh). Example: bash scripts/edkm.sh eval --max-windows 8
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
export HF_HUB_OFFLINE=1
exec "$root/${EDKM_VENV:-.venv}/bin/python" -m edkm "$@"
