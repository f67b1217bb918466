#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests and real multi-rank MPI jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=mpich,dev bash scripts/install.sh
.venv/bin/python -m pytest -q -ra "$@"
