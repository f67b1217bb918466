#!/usr/bin/env bash
# One device call: environment probe, GPU tests and the issue-5 benchmarks, results under $OUT.
# Usage (from the repo root on the GPU machine): bash tools/device/run_gpu.sh STAGE...
#   stages: probe tests decode train weights e2e   (default: these, one GPU)
#           trainloop                               (micro-batches of varying length: dynamic vs bucketed graphs)
#           shared                                  (trainer step: a group's prompt shared in the stream vs copied)
#           syncprobe                               (which lines of the step loops wait for the GPU; host-bound?)
#           broadcast e2e4                          (issue 6: a node with 2-4 GPUs, one rank per GPU)
#           megatron                                (issue 22: the megatron backend's tests, its MPI run and the
#                                                    trainer benchmark beside the torch trainer, 0.5B and 1.5B)
#           smol                                    (the real-model config on the GPU: SmolLM2 on word problems;
#                                                    the GGUF file travels in parts as .gguf_[abc]/smol.part.*)
set -u -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1  # the lent machines run commands as root
OUT=${OUT:-/tmp/areal_gpu_out}; mkdir -p "$OUT"
stages=${*:-probe tests decode train weights e2e}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" PATH="/tmp/site/bin:$PATH"
fi
for s in $stages; do
  echo "=== $s $(date +%T)"
  case $s in
    probe)
      nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
      python3 -c "import torch, inspect; from torch.nn.attention.varlen import varlen_attn as v; print(torch.__version__, inspect.signature(v))"
      python3 -c "import mpi4py; from mpi4py import MPI; print(mpi4py.__version__, MPI.Get_library_version()[:60])"
      which mpiexec || true
      which nvidia-cuda-mps-control || echo "nvidia-cuda-mps-control: not installed"
      nvidia-smi --query-gpu=compute_mode --format=csv ;;
    tests)
      python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests --ignore=tests/mpi --ignore=tests/slurm \
        2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    decode) python3 tools/bench/decode_throughput.py --batch ${DECODE_BATCH:-64 256} --prompt "${DECODE_PROMPT:-128}" \
              --new "${DECODE_NEW:-256}" --profile ${DECODE_EXTRA:-} \
              --out "$OUT/${DECODE_OUT:-decode}.json" 2>&1 | tee "$OUT/${DECODE_OUT:-decode}.log" ;;
    train) python3 tools/bench/train_throughput.py --no-hf ${TRAIN_PROFILE:+--profile} --steps ${TRAIN_STEPS:-5} ${TRAIN_VARIANTS:+--variants $TRAIN_VARIANTS} \
             --out "$OUT/train.json" ;;
    trainloop) python3 tools/bench/train_throughput.py --no-hf --token-budget 6000 --steps ${TRAIN_STEPS:-5} \
             --variants packed+compile packed+compile+bucket1024 --out "$OUT/train_loop.json" ;;
    megatron)
      [ "${MEGATRON_TESTS:-1}" = 0 ] || python3 -m pytest -q -p no:cacheprovider -rs -x tests/test_megatron_convert.py tests/test_megatron_engine.py \
        ${MEGATRON_MPI:+tests/mpi/test_megatron_run.py} 2>&1 | tee "$OUT/megatron_tests.log" | tail -25
      for preset in ${MEGATRON_PRESETS:-qwen2-0.5b qwen2-1.5b}; do
        python3 tools/bench/train_throughput.py --no-hf --backend megatron --variants packed+compile \
          --preset "$preset" --token-budget "${MEGATRON_BUDGET:-4096}" --steps "${TRAIN_STEPS:-4}" --out "$OUT/train_megatron_$preset.json" 2>&1 | tail -6
      done ;;
    weights) python3 tools/bench/weight_sync.py --out "$OUT/weight_sync.json" ;;
    shared) python3 tools/bench/shared_prompts.py ${SHARED_PROFILE:+--profile} --out "$OUT/shared_prompts.json" 2>&1 | tee "$OUT/shared_prompts.log" ;;
    syncprobe) python3 tools/device/sync_probe.py --out "$OUT/sync_probe.json" ;;
    e2e) python3 tools/bench/e2e_one_gpu.py --cache-dir /tmp/e2ecache --steps "${E2E_STEPS:-10}" \
           --skip "${E2E_SKIP:-2}" --eta ${E2E_ETA:-1 2 4 8} --stale-policy ${E2E_POLICY:-reject} \
           --abort-stale ${E2E_ABORT:-on} --timeout "${E2E_TIMEOUT:-360}" ${E2E_SYNC_FROM:+--sync-from "$E2E_SYNC_FROM"} \
           $(for v in ${E2E_VARY:-}; do printf -- '--vary %s ' "$v"; done) \
           --out "$OUT/${E2E_OUT:-e2e}.json" ${E2E_OVERRIDES:-} 2>&1 | tee "$OUT/${E2E_OUT:-e2e}.log" ;;
    broadcast)
      n=$(nvidia-smi -L | wc -l)
      mpiexec -n "$n" python3 tools/bench/broadcast_multi_gpu.py --out "$OUT/broadcast_${n}gpu.json" ;;
    smol)
      cat .gguf_*/smol.part.* > /tmp/smol.gguf
      python3 -m areal_hpc.cli train configs/smollm2-wordproblems.yaml model.path=/tmp/smol.gguf model.device=cuda \
        run.output_dir="$OUT/runs" run.name=smol-gpu run.cache_dir=/tmp/smolcache run.progress=false \
        run.final_checkpoint=none ${SMOL_OVERRIDES:-} 2>&1 | tee "$OUT/smol_gpu.log" | tail -40 ;;
    e2e4) python3 tools/bench/e2e_one_gpu.py --config configs/gpu-4x-synthetic.yaml --eta 1 2 4 8 \
            --cache-dir /tmp/e2ecache --out "$OUT/e2e_4gpu.json" ;;
  esac
done
