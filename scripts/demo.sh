#!/usr/bin/env bash
# The main job: the demo stack (etcd, NATS, Dynamo frontend, two mocker workers) on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p .state/demo
exec .venv/bin/dynsupd --state-dir .state/demo "$@" units/demo
