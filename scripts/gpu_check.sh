#!/usr/bin/env bash
# GPU check, for a CUDA machine: the model tests in bf16 on the GPU, then the memory and decode
# benchmarks at Ouro-1.4B's shapes (random weights), contexts up to 32k. Writes JSON (+ PNG)
# under $OUT (default runs/gpu_check). Expects the project installed (make setup) or a venv.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" || true
"$PY" -m pytest tests/gpu tests/models/test_melt.py tests/models/test_looplm.py -q 2>&1 | tee "$OUT/tests.txt"
"$PY" -m pipeline.bench memory --preset ouro-1.4b --loops 1,2,4,8 --context 32768 --new-tokens 16 \
    --prefill-chunk 1024 --out "$OUT/memory.json"
"$PY" -m pipeline.bench decode --preset ouro-1.4b --loops 4 --context 4096 --new-tokens 128 \
    --budget-batch 4 --prefill-chunk 1024 --out "$OUT/decode.json"
echo "GPU check written to $OUT"
