#!/usr/bin/env bash
# Train mini-sd on a lent GPU machine (the `device` tool of this workplace): the image there has
# torch and transformers but not diffusers or this package, and reaches no network. Carried in:
# .whl (diffusers' wheel), .data/fashion-mnist (Debian's dataset-fashion-mnist files).
# Writes into $OUT: the exported pipeline as a tar split in 15 MB parts, loss.jsonl,
# summary.json and samples.png. Usage there: bash scripts/gpu-train-mini-sd.sh VAE_S UNET_S
set -euo pipefail
VAE_S=${1:-90}
UNET_S=${2:-330}
shift 2 || true  # further arguments go to `stepfleet train` (e.g. --init-from DIR --unet-batch 1024)
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pkg/stepfleet
cp stepfleet/*.py /tmp/pkg/stepfleet/
for d in serving training operator; do ln -sfn "$PWD/$d" /tmp/pkg/stepfleet/$d; done
export PYTHONSAFEPATH=1 PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1 STEPFLEET_FASHION_MNIST=$PWD/.data/fashion-mnist
nvidia-smi -L || true
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
RUN=/tmp/run
python3 -m stepfleet.cli train mini-sd --out $RUN --device cuda --vae-steps 2500 --vae-seconds "$VAE_S" \
  --unet-steps 100000 --unet-seconds "$UNET_S" --checkpoint-every-s 100000 --log-every 100 "$@" 2>&1 \
  | tr '\r' '\n' | awk '/it\/s|s\/it/ { if (++n % 15) next } { print }'
cp $RUN/loss.jsonl $RUN/summary.json "$OUT"/
python3 -c "
from pathlib import Path
from stepfleet.training.samples import sample_grid
sample_grid(Path('$RUN/pipeline'), Path('$OUT/samples.png'), device='cuda')
"
tar -C $RUN -cf - pipeline | split -b 15m - "$OUT/pipeline.tar.part-"
ls -la "$OUT"
