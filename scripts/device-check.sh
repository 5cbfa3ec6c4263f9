#!/usr/bin/env bash
# The GPU check, as one prepared script: engine bench, fit and batch explain at the Pythia-70M
# shape on the CPU and on each GPU execution provider that works here (cuda, webgpu), scores
# compared with the CPU run (Spearman >= 0.999), throughput next to the CPU's.
#
#   scripts/device-check.sh [model-dir] [cuda] [webgpu]
#
# model-dir defaults to a random-weight Pythia-70M-shaped checkpoint, written once by
# test/oracle/make_shape.py (needs test/oracle/.venv; or pass a checkpoint made elsewhere).
# Exit codes: 0 ok, 1 a device disagrees with the CPU, 2 no GPU/provider (or setup missing).
set -euo pipefail
cd "$(dirname "$0")/.."

model="${1:-.cache/device-check/pythia-70m}"
shift || true

if ! command -v node >/dev/null; then
  echo "FAIL: node (>= 20) is not on PATH" >&2
  exit 2
fi
if ! command -v nvidia-smi >/dev/null && [ ! -e /dev/dri ]; then
  echo "FAIL: no GPU here (no nvidia-smi, no /dev/dri): this check needs a machine with a GPU" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if [ ! -f "$model/config.json" ]; then
  py="${PYTHON:-test/oracle/.venv/bin/python}"
  if [ ! -x "$py" ]; then
    echo "FAIL: no checkpoint at $model and no $py to make one (see test/oracle/README.md), or pass a model dir" >&2
    exit 2
  fi
  "$py" test/oracle/make_shape.py pythia-70m "$model"
fi

export INFLUENCE_LENS_CACHE="${INFLUENCE_LENS_CACHE:-$PWD/.cache/device-check/cache}"
exec node --import tsx scripts/device-check.ts "$model" "$@"
