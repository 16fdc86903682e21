#!/usr/bin/env bash
# Download, here, the cp312 x86-64 wheels of what fastcsm needs and the GPU machine's image lacks,
# into .device-wheels/ (git-ignored; `gpu_check.sh` installs them offline there). The image holds
# torch 2.11, numpy, safetensors, tokenizers, huggingface_hub, transformers, pytest, httpx, h11,
# anyio, click, typing-extensions, annotated-doc, idna (KINDS.md of the device docs); it lacks the
# audio I/O and the server stack. Versions are pinned to what this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.device-wheels
WHEELS=(
    soundfile==0.14.0 cffi==2.0.0 pycparser==3.0   # audio files (libsndfile is inside the wheel)
    soxr==1.1.0                                    # resampling
    av==18.1.0                                     # FFmpeg (inside the wheel): streamed flac, mp3, opus, aac, speed
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0
    typing-inspection==0.4.2 opentelemetry-api==1.45.2 uvicorn==0.54.0 websockets==17.4 python-multipart==0.0.34
)
rm -rf "$dest" && mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$dest" "${WHEELS[@]}"
ls -1 "$dest"
du -sh "$dest"
