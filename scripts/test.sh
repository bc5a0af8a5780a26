#!/usr/bin/env bash
# Runs the test suite inside the project's virtual environment, creating it first if needed.
# Extra arguments go to pytest, e.g. bash scripts/test.sh tests/test_dkm.py -x; with none it
# runs tests/ and the examples in the docstrings of edkm.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 EDKM_NO_PROGRESS=1
if [ "$#" -eq 0 ]; then
  set -- tests --doctest-modules edkm
fi
# pytest exits 5 when no test was collected; that is a failure here too.
exec "${EDKM_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider "$@"
