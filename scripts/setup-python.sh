#!/usr/bin/env bash
# Create .venv from the lock file (uv, --locked: a stale lock fails instead of re-resolving).
# Usage: scripts/setup-python.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_PYTHON_DOWNLOADS=never
if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check uv
fi
extra=()
[ "${1:-}" = "--dev" ] && extra=(--extra dev)
py=$(command -v python3.11 || command -v python3)
uv sync --quiet --locked --python "$py" "${extra[@]}"
