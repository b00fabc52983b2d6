#!/usr/bin/env bash
# Build on this CPU the inputs benchmarks/gpu_check.sh wants from a trained policy, so that
# a session lent a GPU spends none of its device minutes making them:
#   .gpu/data/HalfCheetah-v5-medium.zarr   a medium dataset from an ARS behaviour policy
#   .gpu/run/checkpoints/ckpt_<ITERS>      IDQL (v2 sizes, batch 256) trained ITERS iterations,
#                                          as the checkpoint of docs/engines.md's bf16 table
#   .gpu/states.npy                        512 of the dataset's observations (float32)
# Then, with the device tool: carry [".gpu"] and run
#   CKPT=.gpu/run/checkpoints/ckpt_<ITERS> STATES=.gpu/states.npy bash benchmarks/gpu_check.sh
# .gpu/ is git-ignored; a fresh clone has none (the earlier sessions' copy was lost that
# way). About 10-15 minutes on 2 cores. ITERS=8000 SIZE=100000 bash benchmarks/prepare_gpu_inputs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ITERS=${ITERS:-8000}
SIZE=${SIZE:-100000}
OUT=.gpu
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -d "$OUT/data/HalfCheetah-v5-medium.zarr" ]; then
  "$PY" -m idql_runtime.cli.collect --env HalfCheetah-v5 --out "$OUT/data" --size "$SIZE" \
    --datasets medium --ref-episodes 5 --quiet
fi
"$PY" -m learner --dataset "$OUT/data/HalfCheetah-v5-medium.zarr" --config configs/locomotion.yaml \
  --run-dir "$OUT/run" --resume --no-progress \
  --set "train.iterations=$ITERS" --set "train.checkpoint_interval=$ITERS" --set train.batch_size=256 \
  --set train.eval_interval=0
"$PY" - "$OUT" <<'PYEOF'
import sys
from pathlib import Path

import numpy as np

from idql_runtime.replay import ReplayStore

out = Path(sys.argv[1])
store = ReplayStore.open(out / "data" / "HalfCheetah-v5-medium.zarr")
rows = np.random.default_rng(0).choice(len(store), size=512, replace=False)
obs = store.read(0, len(store), keys=["obs"])["obs"][np.sort(rows)].astype(np.float32)
np.save(out / "states.npy", obs)
print(f"{out}/states.npy: {obs.shape} from {len(store)} rows")
PYEOF
ls -d "$OUT"/run/checkpoints/ckpt_*
