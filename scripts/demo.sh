#!/usr/bin/env bash
# The main job: the demo stack (units/demo) on CPU, in the foreground: Dynamo's
# frontend on 127.0.0.1:8000 and two replicas of a tiny model on the GPU-free
# mocker engine. Discovery is file-based: no etcd, no NATS.
#
#   bash scripts/demo.sh [--fresh] [DYNSUPD_OPTION...]
#
# State survives between runs in .state/demo ($DYNSUP_DEMO_STATE) (units stopped or started by hand,
# `dynsupctl scale` counts, port blocks, discovery files). --fresh deletes it
# first, so the stack starts as units/demo says.
set -euo pipefail
cd "$(dirname "$0")/.."
state="${DYNSUP_DEMO_STATE:-.state/demo}"  # tests point it elsewhere
if [[ "${1:-}" == "--fresh" ]]; then
    shift
    echo "demo: --fresh: removing $state (hand-set states, scale counts, discovery files)"
    rm -rf -- "$state"
fi
bash scripts/setup.sh
mkdir -p "$state"
exec .venv/bin/dynsupd --state-dir "$state" "$@" units/demo
