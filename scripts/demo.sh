#!/usr/bin/env bash
# Set up (idempotent) and run the main job: a chat answer from the embedded SmolLM2 model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m koala "$@"
