#!/usr/bin/env bash
# The prepared GPU benchmark (bulk of the logic: bench/gpu_bench.py). One run, under 8 minutes on one GPU,
# nothing downloaded; prints a markdown table (also bench/out/gpu.md) ready for docs/benchmarks.md.
#
#   bench/gpu.sh               full run (needs CUDA): real-size random SD1.5 weights, fp16
#   bench/gpu.sh --smoke       CPU check with tiny models (what tests/test_bench_gpu.py runs)
#   PYTHON=/path/to/python bench/gpu.sh ...    use that interpreter instead of .venv
#   BENCH_TIMEOUT=470          hard limit in seconds (the Python side stops starting sections 25 s before)
#
# Extra arguments go to gpu_bench.py (--out, --workdir, --only SECTION...).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1
# this checkout's sources win over whatever baka the interpreter has installed
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ -n "${PYTHON:-}" ]; then
  PY_BIN=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY_BIN=.venv/bin/python
else
  # the same steps as the Makefile's .venv target (torch pinned first, then the project with dev extras)
  echo "gpu.sh: no .venv; creating it as the Makefile does"
  ${PY:-python3} -m venv .venv \
    && .venv/bin/pip install -q torch==2.13.0 \
    && .venv/bin/pip install -q -e ".[dev]" \
    && touch .venv/.installed \
    || { echo "gpu.sh: creating .venv failed (offline machine without local wheels?)"; exit 1; }
  .venv/bin/pip install -q -e ".[bench]" || echo "gpu.sh: sd-mecha not installed; its column will say n/a"
  PY_BIN=.venv/bin/python
fi

echo "gpu.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), python: $PY_BIN"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    || echo "nvidia-smi: failed"
else
  echo "nvidia-smi: not found"
fi

LIMIT=${BENCH_TIMEOUT:-470}
exec timeout -k 15 "$LIMIT" "$PY_BIN" bench/gpu_bench.py --budget "$((LIMIT - 25))" "$@"
