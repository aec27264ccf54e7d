#!/usr/bin/env bash
# One-call device check, one JSON object: step latency and training throughput on the GPU
# beside the CPU of the same machine, float32 and mixed_bfloat16; which LSTM kernel the
# training windows ran on; bfloat16's accuracy against float32 (PRECISION_STEPS=0 skips it).
# Installs nothing over the network; uses .venv when present (./dev setup creates it), else
# the python3 on PATH with streamer importable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export TF_CPP_MIN_LOG_LEVEL=2
exec "$PY" -m streamer bench gpu --entities "${ENTITIES:-400,10000,100000}" \
    --precision-steps "${PRECISION_STEPS:-1000}" --json
