#!/usr/bin/env bash
# One-call device check: step latency and training throughput on the GPU beside the CPU of
# the same machine, as one JSON object. Installs nothing over the network; uses .venv when
# present (./dev setup creates it), else the python3 on PATH with streamer importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export TF_CPP_MIN_LOG_LEVEL=2
exec "$PY" -m streamer bench gpu --entities "${ENTITIES:-400,10000,100000}" --json
