#!/usr/bin/env bash
# The GPU benchmark in one command (benchmarks/gpu.py; README, "Benchmarks on a GPU"): on a machine
# whose Python has torch, transformers, peft, accelerate, safetensors and pyarrow but neither this
# project nor diffusers, and no network. The wheels it lacks travel in the wheelhouse (`make
# wheelhouse`: .whl/, benchmarks/wheelhouse.py says what is in it); they are installed into a
# folder of their own, put first on PYTHONPATH, and the machine's own python3 and torch run the
# benchmark. Within TOTAL_S seconds (9 minutes) of its start it writes one JSON file (rewritten
# after every case) and its log, under $OUT when set.
#
#   bash benchmarks/gpu.sh [benchmarks/gpu.py options]      # e.g. --tiny on a CPU
#
# PYTHON, WHEELS and SITE override the interpreter, the wheelhouse and the install folder.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/svdray-site}"
OUT_DIR="${OUT:-gpu-bench-out}"
TOTAL_S="${TOTAL_S:-540}"

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu.sh: no wheels in $WHEELS/: run 'make wheelhouse' where pip can reach the package index" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
rm -rf "$SITE"
if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir --target "$SITE" "${wheels[@]}"
else  # a wheel is a zip of what goes into site-packages
    "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
        "$SITE" "${wheels[@]}"
fi
echo "gpu.sh: ${#wheels[@]} wheels from $WHEELS installed into $SITE in $SECONDS s"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# A wheelhouse built before the checkout's last change would run other code than the benchmark's.
if ! diff -rq -x __pycache__ svdray "$SITE/svdray" >/dev/null; then
    echo "gpu.sh: the wheelhouse's svdray is not this checkout's ('make wheelhouse' again); running the checkout's" >&2
    export PYTHONPATH="$PWD:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1

# The script stops starting cases at its budget; at the hard limit SIGINT ends the case running
# (recorded as interrupted) and the JSON is still written. Options given here come last and win.
limit=$((TOTAL_S - SECONDS - 15))
timeout --signal=INT --kill-after=10 "$limit" \
    "$PYTHON" benchmarks/gpu.py --out "$OUT_DIR/gpu_bench.json" --budget-s $((limit - 45)) "$@" \
    2>&1 | tee "$OUT_DIR/gpu_bench.log"
