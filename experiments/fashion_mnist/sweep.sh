#!/usr/bin/env bash
# Small CRM hyperparameter sweep on the Fashion-MNIST *validation* split.
#
#   experiments/fashion_mnist/sweep.sh OUTDIR ["t lam r0" ...]
#
# Each point trains 4C3F for 5 epochs (CRM from epoch 1, learning-rate decay
# from epoch 3) and evaluates clean and certified accuracy on the 6000
# held-out validation images at eps 0.1/0.25/0.5/1.0 with a warm
# power-iteration estimate of the bound (a selection signal, not a
# certificate). The test split is never read (eval.final_test=False).
# A point whose workdir already holds its final evaluation is skipped, so an
# interrupted sweep continues where it stopped. The table is printed by
#   python -m experiments.fashion_mnist.summarize sweep OUTDIR
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: sweep.sh OUTDIR ["t lam r0" ...]}
shift
points=("$@")
if [ ${#points[@]} -eq 0 ]; then
  # λ and r0 around the reference's MNIST values first, then the soft-min
  # temperature t at the best (λ, r0).
  points=("5 30 2.2" "5 10 1.0" "5 3 1.0" "5 10 2.0" "5 30 1.0"
          "1 30 1.0" "10 30 1.0")
fi
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
for spec in "${points[@]}"; do
  set -- $spec
  name="t$1_lam$2_r0$3"
  if grep -qs '"val/certified_accuracy@1"' "$out/$name/metrics.jsonl"; then
    echo "$name: done already"; continue
  fi
  echo "$name: training (log in $out/$name.log)"
  start=$(date +%s)
  "$python" train.py --config configs/fashion_mnist.py --workdir "$out/$name" \
    --config.num_epochs=5 --config.loss.robust_start_epoch=1 \
    --config.optimizer.decay_start_epoch=3 \
    --config.loss.t="$1" --config.loss.lam="$2" --config.loss.r0="$3" \
    --config.eval.every_epochs=5 --config.eval.final_test=False \
    --config.progress=False > "$out/$name.log" 2>&1
  echo "$name: done in $(( $(date +%s) - start )) s"
done
