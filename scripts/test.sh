#!/usr/bin/env bash
# Everything the tests need, then the whole suite: host packages (when root), the Python
# environment with the dev extras, and pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
bash scripts/setup-python.sh --dev
exec .venv/bin/python -m pytest "$@"
