#!/usr/bin/env bash
# One-command GPU check (needs one CUDA GPU): gpt2-124m in bf16 for 40 steps -> tokens/s, MFU,
# peak memory; then the one-rank equivalence of our DP wrapper on the GPU. Prints a JSON summary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
exec "$PY" benchmarks/gpu_check.py "$@"
