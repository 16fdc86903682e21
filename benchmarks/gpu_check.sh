#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine that reaches no package registry (Python 3.12,
# torch 2.11, transformers 5.17; see README "GPU check"). Run `benchmarks/device_wheels.sh` here
# first and carry `.device-wheels`; then, on the GPU machine, from the repository root:
#     benchmarks/gpu_check.sh
# Steps, each bounded so that the whole run stays under 8 minutes and prints its progress:
#   1. install the carried wheels offline, then fastcsm itself with --no-deps;
#   2. tests/test_cuda.py (graphs equal eager in fp32 and bf16, int8/fp8 captured and compiled),
#      the 8-bit tests, the engine and model tests;
#  2b. the 8-bit Triton kernel: tests/test_kernels.py on the GPU (every autotuning candidate), then
#      benchmarks/bench_quant_kernels.py (csm-1b's linears, bf16 / weight-only / Triton / _scaled_mm);
#   3. the bench on random csm-1b weights: bf16, int8, fp8 side by side at batches 1, 64, 256,
#      captured, with time to first audio (10 s voice prompt), accuracy and the transformers peer;
#   4. bf16 compiled (inductor: ~200 s for csm-1b on 16 cores) and captured at batch 1.
# Results go to $OUT (default /tmp/gpu_check): env.txt, tests.log, tests_kernels.log,
# bench_quant_kernels.json, bench_graphs.json,
# bench_compiled.json, and gpu_check.log with everything printed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
step() { echo "=== [$(( $(date +%s) - start )) s] $*"; }

step "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
  python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")'
  python3 -c 'import transformers; print("transformers", transformers.__version__)'; } 2>&1 | tee "$out/env.txt"

python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' || {
    echo "no CUDA device here: this script installs packages and benchmarks a GPU, run it on a GPU machine"; exit 2; }

step "offline install of .device-wheels (then fastcsm --no-deps)"
if [ -d .device-wheels ]; then
    python3 -m pip install -q --no-index --find-links .device-wheels \
        soundfile soxr fastapi uvicorn websockets python-multipart || echo "WHEELS FAILED"
    python3 -m pip install -q --no-index --no-deps --no-build-isolation . || echo "(fastcsm runs from PYTHONPATH)"
else
    echo "no .device-wheels: run benchmarks/device_wheels.sh here and carry .device-wheels"
fi
python3 -c 'import fastcsm.bench, fastcsm.server.app, soundfile, soxr; print("imports ok")'

step "tests: CUDA, 8-bit, engine, model"
timeout 180 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py tests/test_quant.py \
    tests/test_engine.py tests/test_model.py 2>&1 | tee "$out/tests.log" | tail -25

step "8-bit kernels: Triton kernel tests, then the microbench of csm-1b's linears"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$out/tests_kernels.log" | tail -8
timeout 90 python3 benchmarks/bench_quant_kernels.py | tail -1 | tee "$out/bench_quant_kernels.json"

step "bench: csm-1b bf16 / int8 / fp8, captured, batches 1 8 64 256"
timeout 200 python3 -m fastcsm.bench --preset csm-1b --device cuda --batch 1,64,256 --steps 30 \
    --quantize none,int8,fp8 --peer-frames 10 | tail -1 | tee "$out/bench_graphs.json"

left=$(( 475 - ($(date +%s) - start) ))
step "profile: one csm-1b bf16 frame's kernels, eager and captured, batches 1 and 64; ${left} s left"
if [ "$left" -gt 120 ]; then  # -> $out/profile.json (kernels a frame, busy time, gaps, top kernels)
    timeout 120 python3 benchmarks/profile_step.py --batch 1,64 | tail -1 | tee "$out/profile.json"
else
    echo "skipped: less than 120 s left"
fi

left=$(( 475 - ($(date +%s) - start) ))
step "bench: bf16 compiled and captured, batch 1; ${left} s left"
if [ "$left" -gt 235 ]; then
    timeout "$left" python3 -m fastcsm.bench --preset csm-1b --device cuda --batch 1 --steps 30 --compile \
        --no-peer | tail -1 | tee "$out/bench_compiled.json"
else
    echo "skipped: compiling csm-1b's step takes ~200 s"
fi
step "done"
