#!/usr/bin/env bash
# Train and evaluate the MNIST comparison: VAE, ME (M=4) and RecMix (M=4) with the same decoder and
# epochs, plus the RecMix ablation (lambda, eps mode, schedule, KL form). Each run writes
# OUT/NAME/{last.pt,metrics.jsonl,results.json,train.log}; `scripts/summarize_runs.py OUT` tabulates them.
#
#   EPOCHS=50 OUT=runs/mnist PARALLEL=8 bash scripts/mnist_comparison.sh [NAME ...]
#
# PARALLEL runs share the machine (one GPU serves several processes well; on a CPU use 1).
set -euo pipefail
EPOCHS=${EPOCHS:-50}
OUT=${OUT:-runs/mnist}
PARALLEL=${PARALLEL:-1}
PYTHON=${PYTHON:-python}
EXTRA=${EXTRA:-}
declare -A RUNS=(
  [vae]="--method vae"
  [me]="--method me --mixture-order 4"
  [recmix]="--method recmix --mixture-order 4"
  [recmix-amortized]="--method recmix --mixture-order 4 --eps-mode amortized"
  [recmix-allstart]="--method recmix --mixture-order 4 --add-every 0"
  [recmix-lam0]="--method recmix --mixture-order 4 --lam 0"
  [recmix-lam0.9]="--method recmix --mixture-order 4 --lam 0.9"
  [recmix-literal]="--method recmix --mixture-order 4 --kl-form literal"
  [recmix-clipped]="--method recmix --mixture-order 4 --kl-form clipped --kl-clip 10"
  [recmix-clipped-allstart]="--method recmix --mixture-order 4 --kl-form clipped --kl-clip 10 --add-every 0"
  [recmix-joint]="--method recmix --mixture-order 4 --refine joint"
  [recmix-joint-amortized]="--method recmix --mixture-order 4 --refine joint --eps-mode amortized"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(vae me recmix recmix-amortized recmix-allstart recmix-lam0 recmix-lam0.9 recmix-literal)
mkdir -p "$OUT"
running=0
for name in "${names[@]}"; do
  flags=${RUNS[$name]:?unknown run $name}
  mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086
  $PYTHON -m training train $flags --epochs "$EPOCHS" --out "$OUT/$name" --no-progress $EXTRA \
    >"$OUT/$name/train.log" 2>&1 &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then wait -n || true; running=$((running - 1)); fi
done
wait
