#!/usr/bin/env bash
# Fetch (or build, for the sdist-only ones), once and where pip reaches PyPI, the wheels the GPU scripts
# install on the device machine (its image has torch 2.11 on Python 3.12 but no diffusers/omegaconf,
# Colossal-AI or DeepSpeed, and no network). One folder per script, each carried alone:
#   bash bench/prepare_wheels.sh gpu_check   # .whl/gpu_check (~9.8 MB)  -> carry=[".whl/gpu_check"]
#   bash bench/prepare_wheels.sh engines     # .whl/engines  (~56 MB)   -> carry=[".whl/engines"]
#   bash bench/prepare_wheels.sh             # both
# The list, with each wheel's size, is bench/wheels.py (`python3 bench/wheels.py plan engines`); the
# folder is checked after the download: every planned wheel once, nothing else, at most 60 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
if (($#)); then
  exec python3 bench/wheels.py prepare "$@"
fi
exec python3 bench/wheels.py prepare gpu_check engines
