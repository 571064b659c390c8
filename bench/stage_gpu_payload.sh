#!/usr/bin/env bash
# Stage what a GPU check needs but the GPU machine cannot download (it has no network) into the ignored
# gpu_payload/ folder, which the device tool then carries (`carry: ["gpu_payload"]`):
#   gpu_payload/fixtures  a copy of ../shared/fixtures (reference outputs; ../shared does not travel)
#   gpu_payload/wheels    diffusers and its pure-Python dependencies, as wheels for the GPU machine's Python
#
#     bash bench/stage_gpu_payload.sh [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
rm -rf gpu_payload && mkdir -p gpu_payload/wheels
if [ -d ../shared/fixtures ]; then
    cp -r ../shared/fixtures gpu_payload/fixtures
    chmod -R u+w gpu_payload/fixtures
fi
# diffusers and what it imports at run time that a bare torch image may lack; binary wheels for the target
# Python so the install works offline there.
python -m pip download --quiet --dest gpu_payload/wheels --only-binary=:all: --python-version "$PYVER" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    diffusers huggingface_hub regex requests filelock importlib_metadata zipp safetensors tqdm pyyaml \
    packaging charset_normalizer idna urllib3 certifi fsspec hf_xet typing_extensions
du -sh gpu_payload/* 2>/dev/null
