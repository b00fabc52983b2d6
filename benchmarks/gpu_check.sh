#!/usr/bin/env bash
# The one prepared GPU check for the engines (docs/engines.md): idql-bench on cuda (eager,
# cuda_graph and the fused-kernel "triton" engine), the gpu-marked tests (the triton
# engine's GPU parity among them), then bf16: cuda_graph, triton and torch.compile
# (max-autotune) at the target shape if time is left. Run from the repository root on a
# CUDA machine; results land under $OUT (8 files at most: env.txt, pytest_gpu.log,
# bench/{bench.json,latency_hist.png,table.txt}, best/{bench.json,latency_hist.png,table.txt}).
# Installs nothing.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=/tmp/idql_inductor
OUT="${OUT:-/tmp/idql_gpu_check}"
BUDGET_S="${BUDGET_S:-330}"
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
mkdir -p "$OUT/bench" "$OUT/best"
PY=python3

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  $PY -c "import triton; print('triton', triton.__version__)" || true
  $PY -c "from idql_runtime.engines.tensorrt import tensorrt_status as s; print('tensorrt:', s() or 'available')"
} 2>&1 | tee "$OUT/env.txt"

echo "== 1. idql-bench on cuda: eager vs cuda_graph and triton (float32), learner (cuda_graph, fp32/TF32) =="
timeout 150 $PY -m idql_runtime.cli.bench --device cuda --engines eager,cuda_graph,triton \
  --samples 16,64,128,256 --batch 1,64 --iters 400 --max-seconds 1.2 \
  --learner --learner-backends cuda_graph,cuda_graph:tf32 --learner-iters 300 --out "$OUT/bench" \
  > /dev/null 2> "$OUT/bench/table.txt"
echo "rc=$?"; cat "$OUT/bench/table.txt"

echo "== 2. gpu-marked tests ($(left)s left) =="
PER_TEST=""; $PY -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout 120"
timeout $(( $(left) - 60 )) $PY -m pytest -m gpu tests/test_engines.py tests/test_triton_engine.py tests/test_learner_step.py \
  -q -rA -p no:cacheprovider $PER_TEST > "$OUT/pytest_gpu.log" 2>&1
echo "rc=$?"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/pytest_gpu.log" | tail -30

echo "== 3. bf16: cuda_graph and triton at B=1, compiled (max-autotune-no-cudagraphs) at N=128 B=1; learner compiled+graph (TF32) ($(left)s left) =="
if [ "$(left)" -gt 50 ]; then
  timeout $(( $(left) - 5 )) $PY -m idql_runtime.cli.bench --device cuda \
    --engines cuda_graph,triton,compiled --dtype bfloat16 --samples 16,64,128,256 --batch 1 \
    --heavy-shapes 128x1 --compile-mode max-autotune-no-cudagraphs --iters 1000 --max-seconds 1.5 \
    --learner --learner-backends compile_cuda_graph:tf32 --learner-iters 300 --out "$OUT/best" \
    > /dev/null 2> "$OUT/best/table.txt"
  echo "rc=$?"; cat "$OUT/best/table.txt"
fi
echo "done in $(( $(date +%s) - START ))s"
