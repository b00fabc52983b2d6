#!/usr/bin/env bash
# device call 2: the split layout at the target shape and at B=64, and the gpu tests
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
S="python3 benchmarks/triton_sweep.py --checkpoint .gpu/ckpt_000008000 --states .gpu/states.npy"
timeout 170 $S --samples 128 --batch 1 --out $OUT/sweep_b1.jsonl --variants \
  triton:bfloat16 cuda_graph:bfloat16 triton:bfloat16:split_width=32,hidden_chunk=32 \
  triton:bfloat16:split_width=128 triton:bfloat16:split_width=256 triton:bfloat16:num_warps=2 \
  triton:bfloat16:num_warps=8 triton:float32 triton:float32:input_precision=tf32 \
  triton:float16 triton:bfloat16:layout=fused cuda_graph:float32 \
  triton:bfloat16:split_width=32,hidden_chunk=16,num_warps=2 triton:float32:split_width=32 \
  > /dev/null 2> $OUT/sweep_b1.txt; echo rc=$?; cat $OUT/sweep_b1.txt
timeout 110 $S --samples 128 --batch 64 --precision-states 64 --max-seconds 0.6 --iters 300 --out $OUT/sweep_b64.jsonl --variants \
  triton:bfloat16 cuda_graph:bfloat16 triton:bfloat16:block_m=32 triton:bfloat16:block_m=64,split_width=128 \
  triton:bfloat16:block_m=64,split_width=256,num_warps=8 triton:bfloat16:block_m=128,split_width=256,num_warps=8 \
  triton:float32 triton:bfloat16:layout=fused,block_m=64 \
  > /dev/null 2> $OUT/sweep_b64.txt; echo rc=$?; cat $OUT/sweep_b64.txt
timeout 150 python3 -m pytest -m gpu tests/test_triton_engine.py tests/test_precision.py -q -rA -p no:cacheprovider --timeout 100 > $OUT/pytest_gpu.log 2>&1
echo rc=$?; grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error:" $OUT/pytest_gpu.log | head -40
