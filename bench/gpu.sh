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
elif python3 -c "import torch; assert torch.cuda.is_available()" >/dev/null 2>&1; then
  # a machine whose python3 already holds CUDA torch (and cannot reach an index to build .venv)
  PY_BIN=python3
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

# has MODULE...: all findable by the interpreter (find_spec: nothing is imported, so it is quick)
has() {
  "$PY_BIN" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" "$@"
}

# offline machines: wheels carried in .whl/ (see bench/gpu-wheels.sh), installed only when needed
case " $* " in *" --smoke "*) SMOKE=1 ;; *) SMOKE=0 ;; esac
if ls .whl/*.whl >/dev/null 2>&1; then
  need=0
  has diffusers ftfy || need=1
  if [ "$SMOKE" = 0 ] && ls .whl/sd_mecha-*.whl >/dev/null 2>&1; then
    has sd_mecha || need=1
  fi
  if [ "$need" = 1 ]; then
    SITE=${BENCH_SITE:-/tmp/baka-bench-site}
    echo "gpu.sh: installing .whl/*.whl into $SITE"
    if "$PY_BIN" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl; then
      export PYTHONPATH="$PYTHONPATH:$SITE"
    else
      echo "gpu.sh: installing the carried wheels failed; going on without them"
    fi
  fi
fi
has torch diffusers transformers accelerate \
  || { echo "gpu.sh: $PY_BIN lacks torch / diffusers / transformers / accelerate"; exit 1; }

echo "gpu.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), python: $PY_BIN"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    || echo "nvidia-smi: failed"
else
  echo "nvidia-smi: not found"
fi

LIMIT=${BENCH_TIMEOUT:-470}
exec timeout -k 15 "$LIMIT" "$PY_BIN" bench/gpu_bench.py --budget "$((LIMIT - 25))" "$@"
