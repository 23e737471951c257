#!/usr/bin/env bash
# The GPU check: one NVIDIA GPU, at most 8 minutes, every stage under its own time limit.
#   1. bench --suite gpu: eager, compiled, compiled + bf16, + CUDA graphs; ResNet-18, batch 128
#   2. a 2-epoch PART run on real CIFAR-10 (ResNet-18, PGD-10, compile on, 1 warm-up epoch);
#      summary.csv gives seconds per epoch and images/s after the first 10 steps (no compilation)
#   3. the CUDA-only tests (pytest -k cuda)
# Needs CIFAR-10 in $DATA (torchvision's files or train/ + test/ image folders; default
# data/cifar10, git-ignored: copy it there and carry it along). Writes $OUT (default gpu-check/).
# The machine needs torch >= 2.5 and typer >= 0.19; an older typer is replaced by a wheel
# from .whl/ when one is there (pip download typer==0.20.0 -d .whl).
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-gpu-check}
DATA=${DATA:-data/cifar10}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python3}
if ! $PYTHON -c "import typer, sys; sys.exit(tuple(map(int, typer.__version__.split('.')[:2])) < (0, 19))"; then
    $PYTHON -m pip install -q --no-deps --no-index --target /tmp/part-site .whl/typer-*.whl && export PYTHONPATH=/tmp/part-site
fi
$PYTHON -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/device.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/device.txt" 2>/dev/null

echo "== 1. bench (eager, compiled, compiled + bf16, + CUDA graphs)"
timeout 270 $PYTHON part.py bench --suite gpu --model resnet18 --batch-size 128 --rounds 5 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"

echo "== 2. two PART epochs on CIFAR-10"
rm -rf "$OUT/run"
timeout 210 $PYTHON part.py train --preset cifar10 --data-dir "$DATA" --cache-dir "$OUT/cache" --epochs 2 --warmup-epochs 1 \
    --lr-milestones 2 --compile --out "$OUT/run" 2>&1 | tee "$OUT/train.log"
[ -f "$OUT/run/summary.csv" ] && cat "$OUT/run/summary.csv"

echo "== 3. CUDA-only tests"
timeout 120 $PYTHON -m pytest -q -p no:cacheprovider test_part.py -k cuda 2>&1 | tail -15 | tee "$OUT/tests.log"
