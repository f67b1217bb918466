#!/usr/bin/env bash
# Install, then run the CPU quickstart: 1 trainer + 2 rollout ranks on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/areal-hpc train configs/quickstart.yaml "$@"
