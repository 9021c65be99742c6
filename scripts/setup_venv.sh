#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install the project with its test extras.
# torch and torchvision are pinned to the builds mosaicml-streaming needs (2.14.1 / 0.29.1);
# set MEMDLM_TORCH_SPEC to install others, e.g. MEMDLM_TORCH_SPEC="torch==2.9.1 torchvision==0.24.1".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"memdlm-pretrain needs Python >= 3.11, found {sys.version.split()[0]}; set PYTHON=python3.11")
PY
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
.venv/bin/python -m pip install --quiet ${MEMDLM_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
# The other dependencies at the versions CI tests (docker/constraints.txt, also used by the Docker image).
if [ -z "${MEMDLM_TORCH_SPEC:-}" ]; then CONSTRAINTS=(-c docker/constraints.txt); else CONSTRAINTS=(); fi
.venv/bin/python -m pip install --quiet "${CONSTRAINTS[@]}" -e ".[test]"
echo "environment ready: $(pwd)/.venv"
