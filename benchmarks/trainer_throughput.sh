#!/usr/bin/env bash
# idql-learner --dataset end to end: iterations/s of the whole offline loop (batches,
# the update step, logging) for each variant given, BACKEND[:SOURCE] = a
# train.learner_backend and optionally a train.batch_source (host: numpy sampler + copies
# each iteration; device: rows resident on the device; default auto), on a random
# HalfCheetah-sized dataset (the numbers do not depend on the data). Prints one JSON line
# per variant from metrics.jsonl: its_per_s since the start (with any compile/capture)
# and steady_its_per_s between the last two log lines (without).
#   DEVICE=cuda ITERS=3000 bash benchmarks/trainer_throughput.sh auto auto:host reference
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
for variant in "$@"; do
  backend="${variant%%:*}"; source=auto
  [ "$variant" != "$backend" ] && source="${variant#*:}"
  name="${backend}_$source"
  $PY -m learner --dataset "$WORK/data.npz" --run-dir "$WORK/run_$name" --no-progress \
    --device "$DEVICE" --set train.iterations="$ITERS" --set train.log_interval=$(( ITERS / 3 )) \
    --set train.eval_interval=0 --set train.checkpoint_interval=$(( ITERS * 10 )) \
    --set train.learner_backend="$backend" --set train.batch_source="$source" \
    > /dev/null 2> "$WORK/$name.log" || {
      echo "{\"backend\": \"$backend\", \"batch_source\": \"$source\", \"error\": \"exit $?, see $WORK/$name.log\"}"; continue; }
  $PY -c "
import json, re, sys
rows = [json.loads(l) for l in open('$WORK/run_$name/metrics.jsonl') if '\"its_per_s\"' in l]
t = [r['iteration'] / r['its_per_s'] for r in rows]  # seconds since the start, per log line
steady = (rows[-1]['iteration'] - rows[-2]['iteration']) / (t[-1] - t[-2])
why = re.findall(r'training batches: (.*)', open('$WORK/$name.log').read())
print(json.dumps({'backend': '$backend', 'batch_source': '$source',
                  'batches': why[-1] if why else None, 'device': '$DEVICE',
                  'iterations': rows[-1]['iteration'],
                  'its_per_s': round(rows[-1]['its_per_s'], 1),
                  'steady_its_per_s': round(steady, 1), 'steady_ms_per_it': round(1e3 / steady, 3)}))"
done
