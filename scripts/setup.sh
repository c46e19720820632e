#!/usr/bin/env bash
# Create .venv and install dynsup with its extras; quick when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
EXTRAS="${DYNSUP_EXTRAS:-dev,dynamo}"
stamp=".venv/.dynsup-installed"
want="$(sha256sum pyproject.toml | cut -c1-16)-$EXTRAS"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
echo "$want" > "$stamp"
