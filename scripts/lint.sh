#!/usr/bin/env bash
# ruff (lint + format check) over everything, mypy over the library and processes.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check .
ruff format --check .
mypy
