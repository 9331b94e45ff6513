#!/usr/bin/env bash
# Issue 20's GPU figures on a lent machine (the `device` tool of this workplace): compiled
# denoiser buckets against eager calls at 1, 2, 4 and 8 rows on the real-architecture SD 1.5 and
# SDXL UNets with random weights (float16): inductor with CUDA graphs (mode reduce-overhead, the
# worker's default on CUDA), and dynamo's plain `cudagraphs` backend (CUDA graphs of the eager
# kernels, no inductor; seconds to capture instead of minutes to compile).
# The image there has torch but not diffusers, pydantic or this package and reaches no network:
# carried in is .whl (diffusers, pydantic and their few missing needs). Writes JSON + logs to $OUT.
# Usage there: bash scripts/gpu-compile-bench.sh [TOTAL_S]   (runs stop at TOTAL_S, default 540)
set -uo pipefail
TOTAL_S=${1:-540}
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/pkg/stepfleet
cp stepfleet/*.py /tmp/pkg/stepfleet/
for d in serving training operator; do ln -sfn "$PWD/$d" /tmp/pkg/stepfleet/$d; done
export PYTHONSAFEPATH=1 PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
export TORCHINDUCTOR_COMPILE_THREADS=16 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
nvidia-smi -L || true
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
bench() {  # NAME MAX_S ARGS...
  local name=$1 cap=$2; shift 2
  local left=$((TOTAL_S - SECONDS)); local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 30 ]; then echo "$name: skipped (${left} s left)"; return; fi
  local start=$SECONDS
  timeout "$limit" python3 -m stepfleet.cli bench compile --json --denoiser-only --device cuda --dtype float16 "$@" \
    > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$name: rc $? in $((SECONDS - start)) s (limit $limit)"; grep -v "kept in float32" "$OUT/$name.log" | tail -6
}
bench compile-sd15-cudagraphs 90 --model sd15-random --size 512 --rows 1,2,4,8 --reps 30 --backend cudagraphs
bench compile-sdxl-cudagraphs 120 --model sdxl-random --size 1024 --rows 1,2,4,8 --reps 20 --backend cudagraphs
bench compile-sd15-inductor 240 --model sd15-random --size 512 --rows 1,2,4,8 --reps 30
bench compile-sdxl-inductor 400 --model sdxl-random --size 1024 --rows 1,2,4,8 --reps 20
ls -la "$OUT"
