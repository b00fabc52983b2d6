#!/usr/bin/env bash
# idql-learner --dataset end to end: iterations/s of the whole offline loop (host
# sampling, batch copies, the update step, logging) for each train.learner_backend given,
# on a random HalfCheetah-sized dataset (the numbers do not depend on the data). Prints
# one JSON line per backend from metrics.jsonl: its_per_s since the start (with any
# compile/capture) and steady_its_per_s between the last two log lines (without).
#   DEVICE=cuda ITERS=3000 bash benchmarks/trainer_throughput.sh auto reference
set -eu
DEVICE="${DEVICE:-cpu}"; ITERS="${ITERS:-3000}"; WORK="${WORK:-/tmp/idql_trainer_tp}"
PY="${PY:-python3}"
rm -rf "$WORK"; mkdir -p "$WORK"
$PY - "$WORK/data.npz" <<'PYEOF'
import sys
import numpy as np
rng = np.random.default_rng(0)
n = 100_000
timeouts = np.zeros(n, bool)
timeouts[999::1000] = True
np.savez(sys.argv[1], observations=rng.standard_normal((n, 17), np.float32),
         actions=rng.uniform(-1, 1, (n, 6)).astype(np.float32),
         rewards=rng.standard_normal(n).astype(np.float32),
         next_observations=rng.standard_normal((n, 17), np.float32),
         terminals=np.zeros(n, bool), timeouts=timeouts)
PYEOF
for backend in "$@"; do
  $PY -m learner --dataset "$WORK/data.npz" --run-dir "$WORK/run_$backend" --no-progress \
    --device "$DEVICE" --set train.iterations="$ITERS" --set train.log_interval=$(( ITERS / 3 )) \
    --set train.eval_interval=0 --set train.checkpoint_interval=$(( ITERS * 10 )) \
    --set train.learner_backend="$backend" > /dev/null 2> "$WORK/$backend.log" || {
      echo "{\"backend\": \"$backend\", \"error\": \"exit $?, see $WORK/$backend.log\"}"; continue; }
  $PY -c "
import json, sys
rows = [json.loads(l) for l in open('$WORK/run_$backend/metrics.jsonl') if '\"its_per_s\"' in l]
t = [r['iteration'] / r['its_per_s'] for r in rows]  # seconds since the start, per log line
steady = (rows[-1]['iteration'] - rows[-2]['iteration']) / (t[-1] - t[-2])
print(json.dumps({'backend': '$backend', 'device': '$DEVICE', 'iterations': rows[-1]['iteration'],
                  'its_per_s': round(rows[-1]['its_per_s'], 1),
                  'steady_its_per_s': round(steady, 1), 'steady_ms_per_it': round(1e3 / steady, 3)}))"
done
