#!/usr/bin/env bash
# Create .venv with dynsup, its dev tools and Dynamo, exactly as locked under
# requirements/; quick when nothing changed.
#
#   bash scripts/setup.sh                         # Dynamo 1.6.1 (the default)
#   DYNSUP_DYNAMO=1.4.2 bash scripts/setup.sh     # the previous release instead
#
# uv (from PyPI, pinned) installs the lock: about ten times faster than pip,
# and `uv pip sync` makes the venv exactly the lock, also when switching
# between Dynamo releases. It lives beside the venv's packages (.venv/.uv), so
# that syncing the venv never removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DYNAMO="${DYNSUP_DYNAMO:-1.6.1}"
UV_VERSION="0.13.9"
lock="requirements/dynamo-$DYNAMO.txt"
if [[ ! -f "$lock" ]]; then
    echo "setup: no lock for Dynamo $DYNAMO; have: $(ls requirements/dynamo-*.txt)" >&2
    exit 2
fi
stamp=".venv/.dynsup-installed"
want="$(cat pyproject.toml "$lock" | sha256sum | cut -c1-16)-$DYNAMO"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
step() { echo "setup: $*" >&2; }
if [[ ! -x .venv/bin/python ]]; then
    step "creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi
if [[ "$(.venv/.uv/bin/uv --version 2>/dev/null)" != "uv $UV_VERSION"* ]]; then
    step "installing uv $UV_VERSION"
    .venv/bin/python -m pip install --quiet --upgrade --target .venv/.uv "uv==$UV_VERSION"
fi
step "installing $lock (Dynamo $DYNAMO)"
# Never fetch a Python of its own: the venv's is the one.
UV_PYTHON_DOWNLOADS=never VIRTUAL_ENV="$PWD/.venv" \
    .venv/.uv/bin/uv pip sync --python .venv/bin/python --allow-empty-requirements "$lock"
echo "$want" > "$stamp"
step "done"
