#!/usr/bin/env bash
# One GPU session's checks, in one go: the CUDA tests (skipped on CPU machines) and the
# realsize GPU table. For a machine whose python3 already holds a CUDA torch and cannot
# reach a package index: WHEELS names a folder of the project's other wheels (pip
# download --no-deps; docs/benchmarks.md "On a GPU"), installed without
# dependencies so the machine's own CUDA torch stays. Results go to OUT (default outputs/gpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [[ -n "${WHEELS:-}" ]]; then
  "$PY" -m pip install -q --no-deps --no-index "$WHEELS"/*.whl
  "$PY" -m pip install -q --no-deps --no-index --no-build-isolation --ignore-requires-python -e .
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"; } | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers, peft, flwr, opacus; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| flwr', flwr.__version__, '| opacus', opacus.__version__)" | tee -a "$OUT/gpu.txt"
# the CUDA paths of tests/test_device.py (training on cuda in bf16, 4-bit and 8-bit bases)
"$PY" -m pytest -p no:cacheprovider -n 0 -q -rs tests/test_device.py 2>&1 | tee "$OUT/tests.txt" || true
"$PY" -m fedslm.simulations.bench realsize --device cuda --out "$OUT/realsize-cuda.json" 2>&1 \
  | grep -v "Loading weights" | tee "$OUT/realsize.txt"
