#!/usr/bin/env bash
# Fetch, once and where pip can reach PyPI, the wheels bench/gpu_check.sh installs on the GPU machine
# (its image has torch 2.11 + transformers on Python 3.12 but no diffusers/omegaconf, and no network).
# (No importlib_metadata: diffusers imports it only on Python < 3.8, and its 10.x wheels need a package the
# GPU image lacks.)
# Writes .whl/ in the repository root (ignored by git); the device call carries it: carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 omegaconf==2.3.0 torchao==0.17.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI: build it here
ls -la .whl
