#!/usr/bin/env bash
# Install, then run the whole test suite (unit tests and real multi-rank MPI jobs): about 15-20 minutes
# on 2 cores, plus the install the first time. Extra arguments go to pytest (e.g. tests/test_config.py).
#
# What it installs: areal_hpc with its test tools into .venv (pip, no root). Run as root on a machine
# with apt-get and without Slurm, it also installs slurm-wlm and munge system-wide (the packages create
# `slurm` and `munge` users) so tests/slurm can submit the sbatch templates to a single-node Slurm that
# they start and stop themselves (slurm/local-cluster.sh). INSTALL_SLURM=0 leaves the system alone;
# tests/slurm then skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "scripts/test.sh: installing areal_hpc and the test tools into .venv ..."
EXTRAS=mpich,dev bash scripts/install.sh
if [ "${INSTALL_SLURM:-1}" != 0 ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 \
        && ! command -v slurmctld >/dev/null 2>&1; then
    # apt prints hundreds of lines: keep them in a file, show them only when the install fails.
    log=${TMPDIR:-/tmp}/areal-hpc-slurm-install.log
    echo "scripts/test.sh: installing Slurm (slurm-wlm, munge) with apt-get for tests/slurm (INSTALL_SLURM=0 skips) ..."
    if ! bash slurm/local-cluster.sh install >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "scripts/test.sh: could not install Slurm (log: $log); tests/slurm will say why they skip" >&2
    fi
fi
echo "scripts/test.sh: running the suite (about 15-20 minutes on 2 cores) ..."
.venv/bin/python -m pytest -q -ra --durations=25 "$@"
