#!/usr/bin/env bash
# The actor's bf16 precision re-check under a learner that finetunes the score network:
# real processes over loopback ZeroMQ, on this machine's CPU. One idql-learner
# (--pretrained CKPT, online.finetune_actor=true, a new score network every 600 updates)
# and one idql-actor (--dtype auto, 16 calibration states, --rate-hz RATE, 1 thread) for
# 60 s; prints the actor's final line (precision_events: each fall-back to float32 and
# each return to bf16, missed ticks, tick lateness) as JSON.
#   CKPT=runs/demo/pretrain/checkpoints RATE=80 bash benchmarks/recheck_e2e.sh OUTDIR
set -euo pipefail
OUT=${1:?usage: recheck_e2e.sh OUTDIR}
CKPT=${CKPT:-runs/demo/pretrain/checkpoints}
RATE=${RATE:-80}
PY=${PYTHON:-python3}
rm -rf "$OUT"; mkdir -p "$OUT"
P=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export PYTHONUNBUFFERED=1
$PY -m learner --pretrained "$CKPT" --replay "$OUT/online.zarr" --bind-ingest "tcp://127.0.0.1:$P" \
  --bind-weights "tcp://127.0.0.1:$((P + 1))" --run-dir "$OUT/online" --max-seconds 80 \
  --set online.finetune_actor=true --set online.publish_every=600 > "$OUT/learner.out" 2> "$OUT/learner.log" &
LEARNER=$!
trap 'kill $LEARNER 2> /dev/null || true' EXIT
sleep 1
$PY -m actor --checkpoint "$CKPT" --env Hopper-v5 --learner "tcp://127.0.0.1:$P" \
  --weights "tcp://127.0.0.1:$((P + 1))" --actor-id 0 --max-seconds 60 --engine cpu --dtype auto \
  --calibration-states 16 --rate-hz "$RATE" --threads 1 > "$OUT/actor.out" 2> "$OUT/actor.log"
grep '"actor_final"' "$OUT/actor.out" | tail -1
