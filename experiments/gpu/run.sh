#!/usr/bin/env bash
# The GPU numbers of BENCHMARKS.md and the README, in one run on one GPU:
#
#   experiments/gpu/run.sh OUTDIR
#
# 0. a smoke test (versions, devices, a 2-step synthetic train.py run) that
#    stops the script within a minute if the environment is broken;
# 1. train-step times at batch 512 (4C3F, 6C2F, 8C2F; CRM and CE) and the
#    certified (Lanczos, delta = 1e-9) bound of each, on an idle GPU:
#    OUTDIR/bench.jsonl;
# 2. the README's Fashion-MNIST results (experiments/fashion_mnist/
#    results.sh: CRM, GloRo, CE, 25 epochs, certified on the 10000 test
#    images), the three losses side by side on the one GPU:
#    OUTDIR/fmnist/{crm,gloro,ce}/ and OUTDIR/results.md.
#
# Needs TFDS_DATA_DIR with the prepared fashion_mnist. PYTHON picks the
# interpreter (default python3). TRAIN_ARGS / CERTIFY_ARGS pass through to
# results.sh (e.g. a shortened smoke run); SKIP_BENCH=1 skips step 1,
# SKIP_RESULTS=1 step 2.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:?usage: experiments/gpu/run.sh OUTDIR}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
stamp() { echo "== $(date +%T) $*"; }

stamp "0. smoke"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$python" -c "import jax, flax, optax, orbax.checkpoint, tensorflow_datasets as t; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'tfds', t.__version__)" || exit 10
smoke="$out/smoke"
rm -rf "$smoke"
{ timeout 240 "$python" train.py --config configs/fashion_mnist.py:quick \
    --workdir "$smoke" --config.num_epochs=1 --config.progress=False \
    --config.data.max_train_examples=2048 \
    --config.data.max_test_examples=256 \
  && timeout 120 "$python" certify.py --workdir "$smoke" --eps 0.25 \
    --num_examples 64 --progress=False; } > "$out/smoke.log" 2>&1 \
  || { tail -30 "$out/smoke.log"; exit 11; }
tail -12 "$out/smoke.log"

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  stamp "1. step times and certified bounds"
  timeout 300 "$python" -m benchmarks.run --quick --only train,certification \
    --archs 4C3F,6C2F,8C2F --output '' --jsonl "$out/bench.jsonl" \
    > "$out/bench.log" 2>&1 || echo "bench exit $?"
  grep -E '"name": "(train_step|certification_lanczos)"' "$out/bench.log" \
    | cut -c1-400
fi

[ "${SKIP_RESULTS:-0}" = 1 ] && exit 0
stamp "2. Fashion-MNIST results (three losses side by side)"
for loss in crm gloro ce; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 PYTHON="$python" \
    experiments/fashion_mnist/results.sh "$out/fmnist" "$loss" \
    > "$out/results_$loss.log" 2>&1 &
done
wait
stamp "done"
"$python" -m experiments.fashion_mnist.summarize results "$out/fmnist" \
  | tee "$out/results.md"
