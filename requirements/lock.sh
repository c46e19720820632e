#!/usr/bin/env bash
# Regenerate the locks: one complete, pinned requirement set per Dynamo release,
# for every Python from 3.10 and every platform (`--universal`). They are
# installed with `--no-deps` (uv pip sync, or pip install --no-deps -r), so
# nothing is resolved again on the target: the same versions on every machine,
# and no `aisimulate` (see excludes.txt).
set -euo pipefail
cd "$(dirname "$0")/.."  # `-e .` in the inputs is the repository
UV="${UV:-uv}"
export UV_PYTHON_DOWNLOADS=never
for input in requirements/dynamo-*.in; do
    "$UV" pip compile "$input" --universal --python-version 3.10 \
        --excludes requirements/excludes.txt --no-annotate --quiet \
        --custom-compile-command "requirements/lock.sh" -o "${input%.in}.txt"
done
