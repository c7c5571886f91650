#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on the CPU; kernels run under Triton's
# interpreter, GPU-only tests skip themselves without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=${TRITON_INTERPRET:-$(python3 -c "import torch; print(0 if torch.cuda.is_available() else 1)")}
exec python3 -m pytest -q "$@"
