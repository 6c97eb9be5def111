#!/usr/bin/env bash
# The main job on a fresh machine: the Python environment, then `vtrace demo` on the
# shipped traces (no root, no KVM needed). Extra arguments go to `vtrace demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-python.sh
exec .venv/bin/vtrace demo "$@"
