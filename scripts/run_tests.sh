#!/usr/bin/env bash
# The test command of README.md: C++ unit tests of csrc/core through ctest, then the Python suite.
# Needs the package installed (see README.md); exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${SAGE_EXT_JOBS:-2}

cmake -S . -B build/ctest -G Ninja -DSAGE_EXT_CORE_TESTS_ONLY=ON >/dev/null
cmake --build build/ctest -j"$jobs"
ctest --test-dir build/ctest --output-on-failure

python -m pytest tests "$@"
