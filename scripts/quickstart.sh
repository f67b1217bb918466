#!/usr/bin/env bash
# Install, then run the CPU quickstart: 1 trainer + 2 rollout ranks on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# exec keeps this shell's pid and start time: say when the launch begins, so the run's closing table
# counts the launch from here and not the install above (areal_hpc/launch/phases.py).
export AREAL_HPC_EXEC_TIME="$$:$(date +%s.%N)"
exec .venv/bin/areal-hpc train configs/quickstart.yaml "$@"
