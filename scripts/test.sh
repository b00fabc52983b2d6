#!/usr/bin/env bash
# Set up and run the tests: the default (fast) suite, or pass pytest args, e.g.
#   bash scripts/test.sh            # default suite (slow and gpu tests deselected)
#   bash scripts/test.sh -m slow    # the long fault-injection / fuzz / collect runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh dev
export MUJOCO_GL=${MUJOCO_GL:-egl}
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
fi
"$PY" -m pytest -q "$@"
