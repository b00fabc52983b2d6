#!/usr/bin/env bash
# Set up and run the demo: make a small Hopper-v5 dataset, pretrain IDQL briefly, then a
# learner and two actors finetune online over loopback ZeroMQ for a bounded time.
#   bash scripts/demo.sh [--seconds 90] [--out runs/demo]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m idql_runtime.cli.demo "$@"
