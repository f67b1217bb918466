#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests and real multi-rank MPI jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=mpich,dev bash scripts/install.sh
# tests/slurm submit the sbatch templates to a local Slurm: install slurm-wlm + munge where we can
# (root with apt-get); the tests start and stop the cluster themselves (slurm/local-cluster.sh).
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && ! command -v slurmctld >/dev/null 2>&1; then
    bash slurm/local-cluster.sh install || echo "scripts/test.sh: could not install Slurm; tests/slurm will say why" >&2
fi
.venv/bin/python -m pytest -q -ra "$@"
