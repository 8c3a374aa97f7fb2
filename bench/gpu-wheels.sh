#!/usr/bin/env bash
# Run HERE (where pip reaches the index) before a GPU run on a machine that has torch (CUDA), transformers,
# accelerate and peft but no network and no diffusers (the lent H200 image: Python 3.12, x86-64). Downloads
# the wheels the benchmark needs beyond those into .whl/ (git-ignored, ~10 MB): diffusers, ftfy and their
# small deps, and sd-mecha with its deps for the merge comparison. bench/gpu.sh installs .whl/ (no index,
# no deps) into a temp folder when the interpreter lacks them. Carry `.whl` with the run.
set -eu
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4 importlib_metadata==10.2.0 \
  sd-mecha==1.1.8 fuzzywuzzy==0.18.0 python-Levenshtein==0.27.5 levenshtein==0.27.5 rapidfuzz==3.14.6 "$@"
ls -l .whl
