#!/usr/bin/env bash
# Run the CUDA tests alone, on a machine with a GPU:  bash tests/run_cuda_tests.sh
# Fails (instead of skipping) when no CUDA device is visible.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
exec "$PY" -m pytest -p no:cacheprovider -q -rs tests/cuda "$@"
