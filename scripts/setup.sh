#!/usr/bin/env bash
# Create .venv with the pinned CPU working set and fastplan itself (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torchrec, fbgemm_gpu, ortools, diskcache, zmq, fastplan" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-cpu.txt
  python -m pip install -q --no-deps torchrec==1.8.0
  python -m pip install -q --no-deps -e .
fi
