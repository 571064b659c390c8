#!/usr/bin/env bash
# Stage what a GPU check needs but the GPU machine cannot download (it has no network) into the ignored
# gpu_payload/ folder, which the device tool then carries (`carry: ["gpu_payload"]`):
#   gpu_payload/wheels    diffusers and importlib_metadata + lazy_importer (what diffusers needs that the image
#                         lacks; it has numpy, Pillow, regex, requests, safetensors, filelock, huggingface_hub),
#                         and pytest-xdist + execnet (the GPU tests in parallel: most of their time is Triton
#                         compiling kernels on the CPU)
#   gpu_payload/fixtures  with --fixtures: a copy of ../shared/fixtures (../shared does not travel); only
#                         needed to run the CPU test-suite there, not for the GPU checks
#
#     bash bench/stage_gpu_payload.sh [--fixtures] [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
FIXTURES=0
if [ "${1:-}" = "--fixtures" ]; then FIXTURES=1; shift; fi
PYVER=${1:-3.12}
rm -rf gpu_payload && mkdir -p gpu_payload/wheels
if [ "$FIXTURES" = 1 ] && [ -d ../shared/fixtures ]; then
    cp -r ../shared/fixtures gpu_payload/fixtures
    chmod -R u+w gpu_payload/fixtures
fi
python -m pip download --quiet --no-deps --dest gpu_payload/wheels --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    diffusers==0.42.1 importlib_metadata zipp lazy_importer pytest-xdist execnet
du -sh gpu_payload/* 2>/dev/null
