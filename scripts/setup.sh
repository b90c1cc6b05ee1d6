#!/usr/bin/env bash
# Create .venv with the pinned CPU working set and fastplan itself (idempotent: reinstalls only
# when requirements-cpu.txt changed since the last install).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.fastplan-requirements
if ! cmp -s requirements-cpu.txt "$stamp" || ! python -c "import torchrec, fbgemm_gpu, fastplan" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-cpu.txt
  python -m pip install -q --no-deps torchrec==1.8.0
  python -m pip install -q --no-deps -e .
  cp requirements-cpu.txt "$stamp"
fi
