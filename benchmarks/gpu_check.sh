#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine that reaches no package registry (Python 3.12,
# torch 2.11, transformers 5.17; see docs/performance.md, "GPU check"). Run `benchmarks/device_wheels.sh` here
# first and carry `.device-wheels`; then, on the GPU machine, from the repository root:
#     benchmarks/gpu_check.sh
# A lent GPU gives ~15 minutes in all, so the steps come most telling first, each with its own
# timeout, and the whole run stays under 9 minutes (one device call) and prints its progress:
#   1. install the carried wheels offline, then fastcsm itself with --no-deps;
#   2. tests/test_cuda.py (graphs equal eager in fp32 and bf16, int8/fp8 captured and compiled) and
#      tests/test_kernels.py (the Triton 8-bit kernel, every autotuning candidate, on the GPU);
#   3. the bench on random csm-1b weights: bf16, int8, fp8 side by side at batches 1, 64, 256,
#      captured, with time to first audio (10 s voice prompt), accuracy and the transformers peer;
#   4. a profile of one bf16 frame's kernels, eager and captured (benchmarks/profile_step.py);
#   5. benchmarks/bench_quant_kernels.py: csm-1b's linears, bf16 / weight-only / Triton / _scaled_mm;
#   6. the 8-bit, engine and model test files on CUDA, then bf16 compiled (inductor: ~200 s for
#      csm-1b on 16 cores) and captured at batch 1, each only if the time left allows.
# Results go to $OUT (default /tmp/gpu_check): env.txt, tests.log, bench_graphs.json,
# profile.json, bench_quant_kernels.json, tests_more.log, bench_compiled.json, and gpu_check.log
# with everything printed.
#
#     benchmarks/gpu_check.sh compile
# is a second device call of its own (under 9.5 minutes), for the compiled step: csm-1b with Mimi
# in the step and 256 slots (buckets 1 ... 256, one compile for all of them), the variant default
# requests run. First starts of bf16 and int8 side by side into empty compile caches (their
# compiles share the CPU cores; each start is timed), then a start of each from its cache, which
# times compiled+captured against captured frames at batches 1, 64, 256 (benchmarks/bench_compile.py).
# Results: compile_first_{bf16,int8}.json, compile_cache_{bf16,int8}.json (cold vs warm start:
# first_start.warmup_s against start_from_cache.warmup_s; frames: start_from_cache.ms_per_frame).
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

if [ "${1:-}" = compile ]; then
    caches=$(mktemp -d)
    bc=(python3 benchmarks/bench_compile.py --device cuda --slots 256 --default-path-only)
    step "compiled: first starts, bf16 and int8 side by side, empty caches"
    timeout 330 "${bc[@]}" --quantize none --only first --cache "$caches/bf16" | tail -1 >"$out/compile_first_bf16.json" &
    timeout 330 "${bc[@]}" --quantize int8 --only first --cache "$caches/int8" | tail -1 >"$out/compile_first_int8.json" &
    wait
    cat "$out"/compile_first_*.json
    for mode in bf16 int8; do
        step "compiled: $mode from its cache, then compiled+captured vs captured at batches 1, 64, 256"
        timeout 110 "${bc[@]}" --quantize "$([ $mode = bf16 ] && echo none || echo int8)" --only second \
            --cache "$caches/$mode" --batches 1,64,256 --rounds 2 --frames 20 | tail -1 \
            | tee "$out/compile_cache_$mode.json"
    done
    step "done"
    exit 0
fi

step "tests: CUDA graphs and the Triton 8-bit kernel"
timeout 150 python3 -m pytest -v -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py 2>&1 \
    | tee "$out/tests.log" | tail -25

step "bench: csm-1b bf16 / int8 / fp8, captured, batches 1 64 256"
timeout 220 python3 -m fastcsm.bench --preset csm-1b --device cuda --batch 1,64,256 --steps 30 \
    --quantize none,int8,fp8 --peer-frames 10 | tail -1 | tee "$out/bench_graphs.json"

budget=520
left() { echo $(( budget - ($(date +%s) - start) )); }
step "profile: one csm-1b bf16 frame's kernels, eager and captured, batches 1 and 64; $(left) s left"
if [ "$(left)" -gt 60 ]; then  # -> $out/profile.json (kernels a frame, busy time, gaps, top kernels)
    timeout 100 python3 benchmarks/profile_step.py --batch 1,64 | tail -1 | tee "$out/profile.json"
else
    echo "skipped: too little time left"
fi

step "8-bit kernels: the microbench of csm-1b's linears; $(left) s left"
if [ "$(left)" -gt 40 ]; then
    timeout 80 python3 benchmarks/bench_quant_kernels.py | tail -1 | tee "$out/bench_quant_kernels.json"
else
    echo "skipped: too little time left"
fi

step "tests: 8-bit, engine, model on CUDA; $(left) s left"
if [ "$(left)" -gt 60 ]; then
    timeout "$(left)" python3 -m pytest -q -x -p no:cacheprovider tests/test_quant.py tests/test_engine.py \
        tests/test_model.py 2>&1 | tee "$out/tests_more.log" | tail -8
else
    echo "skipped: too little time left"
fi

step "bench: bf16 compiled and captured, batch 1; $(left) s left"
if [ "$(left)" -gt 235 ]; then
    timeout "$(left)" python3 -m fastcsm.bench --preset csm-1b --device cuda --batch 1 --steps 30 --compile \
        --no-peer | tail -1 | tee "$out/bench_compiled.json"
else
    echo "skipped: compiling csm-1b's step takes ~200 s"
fi
step "done"
