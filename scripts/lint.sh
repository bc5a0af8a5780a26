#!/usr/bin/env bash
# ruff (lint + format check) and mypy on the installed packages; fails on any finding.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
py="${EDKM_VENV:-.venv}/bin/python"
"$py" -m ruff check edkm tests benchmarks
"$py" -m ruff format --check edkm tests benchmarks
"$py" -m mypy edkm
