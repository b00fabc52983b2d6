#!/usr/bin/env bash
# Install idql-runtime (editable) with its dependencies, KEEPING an existing torch.
#
# pip would happily replace a local CPU torch with a multi-GB CUDA build if asked for
# "torch" or a newer range; so torch is installed only when absent, and then exactly as
# pinned in pyproject.toml (torch==2.13.0). Every other dependency is installed by name,
# and the package itself with --no-deps.
# triton (the "triton" engine; its tests run Triton's CPU interpreter) is kept the same
# way: CUDA torch wheels pin and ship their own, so with the dev or triton extra it is
# installed, --no-deps and at the version tested here, only when none is importable.
#   PYTHON=python3.11 bash scripts/install.sh [extras, e.g. dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  TORCH_PIN=$("$PY" - <<'PYEOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in deps if re.match(r"torch\b", d)))
PYEOF
)
  echo "install: no torch found, installing $TORCH_PIN"
  "$PY" -m pip install -q "$TORCH_PIN"
fi

TRITON_TESTED=3.9.0  # the version the interpreter tests were written against (torch 2.13 CPU)
if [[ ",$EXTRAS," == *,dev,* || ",$EXTRAS," == *,triton,* ]]; then
  if "$PY" -c "import triton" 2>/dev/null; then
    echo "install: keeping triton $("$PY" -c 'import triton; print(triton.__version__)')"
  else
    echo "install: no triton found, installing triton==$TRITON_TESTED (--no-deps)"
    "$PY" -m pip install -q --no-deps "triton==$TRITON_TESTED"
  fi
fi

mapfile -t DEPS < <("$PY" - "$EXTRAS" <<'PYEOF'
import re, sys, tomllib
proj = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = list(proj["dependencies"])
for extra in filter(None, sys.argv[1].split(",")):
    deps += proj["optional-dependencies"][extra]
for d in deps:
    # torch and triton are handled above; torch-tensorrt pins torch
    if not re.match(r"torch\b", d) and not re.match(r"triton\b", d):
        print(d)
PYEOF
)
"$PY" -m pip install -q "${DEPS[@]}"
"$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
echo "install: idql-runtime $("$PY" -c 'import idql_runtime; print(idql_runtime.__version__)') ready"
