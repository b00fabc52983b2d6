#!/usr/bin/env bash
# device call 3 (last): split layout with parts summed (no atomics), then its gpu tests
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
S="python3 benchmarks/triton_sweep.py --checkpoint .gpu/ckpt_000008000 --states .gpu/states.npy --precision-states 32 --max-seconds 0.7"
timeout 100 $S --samples 128 --batch 1 --out $OUT/sweep3_b1.jsonl --variants \
  triton:bfloat16:num_warps=8 triton:bfloat16:split_width=128,num_warps=8 triton:bfloat16 \
  triton:bfloat16:split_width=128,hidden_chunk=128,num_warps=8 triton:bfloat16:split_width=256,num_warps=8 \
  triton:float32:num_warps=8 triton:float32:input_precision=tf32,num_warps=8 \
  triton:bfloat16:split_width=32,hidden_chunk=32,num_warps=4 cuda_graph:bfloat16 \
  > /dev/null 2> $OUT/sweep3_b1.txt; echo rc=$?; cat $OUT/sweep3_b1.txt
timeout 80 python3 -m pytest -m gpu tests/test_triton_engine.py -k "split or rng or load_weights or opts2 or opts3 or opts4 or opts5 or opts6" -q -rA -p no:cacheprovider --timeout 60 > $OUT/pytest3.log 2>&1
echo rc=$?; grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error:" $OUT/pytest3.log | head -30
timeout 30 $S --samples 128 --batch 64 --precision-states 0 --max-seconds 0.4 --iters 200 --out $OUT/sweep3_b64.jsonl --variants \
  triton:bfloat16:num_warps=8 cuda_graph:bfloat16 triton:bfloat16:split_width=128,num_warps=8 \
  > /dev/null 2> $OUT/sweep3_b64.txt; echo rc=$?; cat $OUT/sweep3_b64.txt
