#!/usr/bin/env bash
# Runs the test suite inside the project's virtual environment, creating it first if needed.
#
#   bash scripts/test.sh               the fast lane: tests/ and the docstring examples of edkm,
#                                      without the tests marked slow (-m "not slow")
#   bash scripts/test.sh --all         everything, slow tests included (also: EDKM_TEST_ALL=1);
#                                      .ci/run does this
#   bash scripts/test.sh tests/io -x   extra arguments go to pytest; when they name no test
#                                      path, tests/ and the doctests of edkm are run
#
# Every run prints the 15 slowest tests (--durations=15). A later -m replaces the lane's marker
# expression. pytest exits 5 when no test was collected (or all were deselected); that is a
# failure here too.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
all="${EDKM_TEST_ALL:-0}"
[ "$all" = "0" ] && all=""
args=()
has_path=""
for arg in "$@"; do
  if [ "$arg" = "--all" ]; then
    all=1
    continue
  fi
  args+=("$arg")
  # a test path or node id (tests/x.py::test_y, relative to the repository root) that exists, as
  # opposed to an option or its value
  if [ "${arg#-}" = "$arg" ] && [ -e "$root/${arg%%::*}" ]; then
    has_path=1
  fi
done
bash "$root/scripts/setup.sh"
cd "$root"
export HF_HUB_OFFLINE=1 EDKM_NO_PROGRESS=1
lane=(-m "not slow")
[ -n "$all" ] && lane=()
defaults=()
[ -z "$has_path" ] && defaults=(tests --doctest-modules edkm)
set +e
"${EDKM_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider --durations=15 \
  ${lane[@]+"${lane[@]}"} ${defaults[@]+"${defaults[@]}"} ${args[@]+"${args[@]}"}
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  hint=""
  [ -z "$all" ] && hint="; tests marked slow run only with --all"
  echo "test.sh: no test was collected (pytest exit 5)$hint" >&2
fi
exit "$rc"
