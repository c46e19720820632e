#!/usr/bin/env bash
# The test command: lint, then every test except the opt-in vLLM one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# pytest exits 5 when it ran no test: that fails here like any other failure.
exec .venv/bin/pytest -m "not vllm and not ray_node_death" "$@"
