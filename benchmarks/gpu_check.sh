#!/usr/bin/env bash
# The one prepared GPU check for the engines (docs/engines.md), in priority order, each
# stage under its own time limit so a short lease still returns the first ones:
#   1. benchmarks/triton_sweep.py at N=128, B=1: the triton engine's options (pdl,
#      prefetch, parts_dtype and graph_copies, not yet measured; split_width) beside cuda_graph (bf16 and fp32),
#      each with its replay time and, with CKPT and
#      STATES set (a checkpoint dir and a .npy of observations), its precision check on
#      trained weights against the float64 reference;
#   1c. the learner iteration (batch 512, TF32) with and without overlap (the actor on a
#      second stream, not yet measured), graph and compiled + graph;
#   1b. benchmarks/gpu_profile.py: the same decisions and the learner step without their
#      graphs under torch.profiler: kernels per call, their summed device time, the top
#      kernels (is a launch slow inside, or is the graph's per-node cost the bound?);
#   2. the gpu-marked tests (triton's parity against float64, cuda_graph, learner step,
#      idql-learner's GPU default in the trainer);
#   2b. idql-learner --dataset end to end on the GPU: steady iterations/s with
#      train.learner_backend auto (the captured step) on device batches (the default
#      there), auto on host batches (numpy sampler + pageable copies each iteration), and
#      reference (Agent.update); then the host time per batch of either source;
#   3. idql-bench on cuda: auto, cuda_graph and triton beside eager at every N, B (float32), learner;
#   4. bf16 idql-bench at B=1 with torch.compile (max-autotune) if time is left;
#   5. ncu on one bf16 block_kernel (stall reasons), if ncu is installed and time is left.
# Run from the repository root on a CUDA machine; results land under $OUT (14 files:
# sweep.jsonl, profile.jsonl, pytest_gpu.log, trainer.jsonl, batch_source.json, bench/ and best/ {bench.json, latency_hist.png, table.txt},
# learner/ {bench.json, table.txt}, ncu_block.txt).
# Installs nothing.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR=/tmp/idql_inductor
OUT="${OUT:-/tmp/idql_gpu_check}"
BUDGET_S="${BUDGET_S:-540}"
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
mkdir -p "$OUT/bench" "$OUT/best" "$OUT/learner"
PY=python3

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  $PY -c "import triton; print('triton', triton.__version__)" || true
  $PY -c "from idql_runtime.engines.tensorrt import tensorrt_status as s; print('tensorrt:', s() or 'available')"
} 2>&1

echo "== 1. triton sweep at N=128, B=1 =="
SWEEP="$PY benchmarks/triton_sweep.py ${CKPT:+--checkpoint $CKPT} ${STATES:+--states $STATES} --precision-states 32 --max-seconds 0.7"
timeout 230 $SWEEP --samples 128 --batch 1 --out "$OUT/sweep.jsonl" --variants \
  triton:bfloat16 triton:bfloat16:pdl=1 triton:bfloat16:prefetch=1 \
  triton:bfloat16:pdl=1,prefetch=1 triton:bfloat16:parts_dtype=float16 \
  triton:bfloat16:pdl=1,prefetch=1,parts_dtype=float16 \
  triton:bfloat16:pdl=1,prefetch=1,graph_copies=1 \
  triton:bfloat16:graph_copies=1 triton:bfloat16:pdl=1,split_width=64 \
  triton:bfloat16:split_width=64 cuda_graph:bfloat16 triton:float32 \
  triton:float32:pdl=1,prefetch=1 \
  2>&1 > /dev/null
echo "rc=$?"

echo "== 1c. learner iteration, batch 512: one stream vs the actor on a second (overlap) ($(left)s left) =="
timeout 150 $PY -m idql_runtime.cli.bench --device cuda --no-decisions --learner \
  --learner-backends cuda_graph:tf32,cuda_graph:tf32:overlap,compile_cuda_graph:tf32,compile_cuda_graph:tf32:overlap \
  --learner-iters 300 --out "$OUT/learner" > /dev/null 2> "$OUT/learner/table.txt"
echo "rc=$?"; cat "$OUT/learner/table.txt"

echo "== 1b. kernel profile: triton and cuda_graph bf16 decisions, learner step ($(left)s left) =="
timeout 100 $PY benchmarks/gpu_profile.py ${CKPT:+--checkpoint $CKPT} --samples 128 --batch 1 \
  --iters 20 --out "$OUT/profile.jsonl" --targets decision:triton:bfloat16 \
  decision:cuda_graph:bfloat16 learner:compile_cuda_graph:tf32 2>/dev/null | cut -c1-900
echo "rc=$?"

echo "== 2. gpu-marked tests ($(left)s left) =="
PER_TEST=""; $PY -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout 120"
timeout $(( $(left) / 2 )) $PY -m pytest -m gpu tests/test_triton_engine.py tests/test_engines.py tests/test_learner_step.py tests/test_trainer.py tests/test_batches.py \
  -v -p no:cacheprovider $PER_TEST > "$OUT/pytest_gpu.log" 2>&1  # -v: a cut log still names each result
echo "rc=$?"; grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/pytest_gpu.log" | tail -40

echo "== 2b. idql-learner --dataset on the GPU: auto (device batches) vs auto:host vs reference, whole loop ($(left)s left) =="
DEVICE=cuda ITERS=3000 PY=$PY WORK=/tmp/idql_trainer_tp timeout 120 \
  bash benchmarks/trainer_throughput.sh auto auto:host reference > "$OUT/trainer.jsonl" 2>&1
echo "rc=$?"; cat "$OUT/trainer.jsonl"
timeout 40 $PY benchmarks/batch_source.py --device cuda > "$OUT/batch_source.json" 2>&1
echo "rc=$?"; cat "$OUT/batch_source.json"

echo "== 3. idql-bench on cuda: auto, cuda_graph and triton beside eager (float32), learner ($(left)s left) =="
timeout $(( $(left) - 60 )) $PY -m idql_runtime.cli.bench --device cuda --engines auto,cuda_graph,triton \
  --samples 16,64,128,256 --batch 1,64 --iters 400 --max-seconds 1.2 \
  --learner --learner-backends cuda_graph,cuda_graph:tf32 --learner-iters 300 --out "$OUT/bench" \
  > /dev/null 2> "$OUT/bench/table.txt"
echo "rc=$?"; cat "$OUT/bench/table.txt"

echo "== 4. bf16: cuda_graph and triton at B=1, compiled (max-autotune-no-cudagraphs) at N=128 B=1; learner compiled+graph (TF32) ($(left)s left) =="
if [ "$(left)" -gt 150 ]; then  # leaves ~90 s for the ncu stage
  timeout $(( $(left) - 95 )) $PY -m idql_runtime.cli.bench --device cuda \
    --engines cuda_graph,triton,compiled --dtype bfloat16 --samples 16,64,128,256 --batch 1 \
    --heavy-shapes 128x1 --compile-mode max-autotune-no-cudagraphs --iters 1000 --max-seconds 1.5 \
    --learner --learner-backends compile_cuda_graph:tf32 --learner-iters 300 --out "$OUT/best" \
    > /dev/null 2> "$OUT/best/table.txt"
  echo "rc=$?"; cat "$OUT/best/table.txt"
fi
echo "== 5. ncu: one bf16 block_kernel's stall reasons, if ncu is here ($(left)s left) =="
if command -v ncu > /dev/null && [ "$(left)" -gt 80 ]; then
  timeout $(( $(left) - 5 )) ncu --kernel-name regex:block_kernel --launch-skip 40 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \
    $PY -c "
import numpy as np, torch
from idql_runtime.agent import Agent
from idql_runtime.config import Config
from idql_runtime.engines import build_engine
torch.manual_seed(0)
eng = build_engine(Agent(Config(), 17, 6), kind='triton', batch=1, samples=128, dtype='bfloat16', device='cuda')
obs = np.zeros((1, 17), np.float32)
for _ in range(20): eng.decide(obs)
" > "$OUT/ncu_block.txt" 2>&1
  echo "rc=$?"; grep -E "Duration|Stall|Warp Cycles|Registers|Achieved Occupancy|Memory Throughput|Elapsed Cycles" "$OUT/ncu_block.txt" | head -30
else
  echo "skipped: no ncu or too little time"
fi
echo "done in $(( $(date +%s) - START ))s"
