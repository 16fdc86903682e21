#!/usr/bin/env bash
# One run on a CUDA machine: the GPU tests, then the engine benchmark on random csm-1b weights,
# eager-captured and compiled, each printing one JSON line. Writes $OUT/*.json when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
export PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_engine.py tests/test_model.py 2>&1 | tail -5
python3 -m fastcsm.bench --preset csm-1b --device cuda --batch 1,8,64,256 | tail -1 | tee "$out/bench_graphs.json"
python3 -m fastcsm.bench --preset csm-1b --device cuda --batch 1,64 --compile --no-peer | tail -1 \
    | tee "$out/bench_compiled.json"
