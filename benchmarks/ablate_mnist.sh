#!/usr/bin/env bash
# Ablations on the demo's teacher: one change per row, 3 minutes of DMD each, probe (500 samples) every 100 steps.
set -u
cd "$(dirname "$0")/.."
BASE="--teacher runs/mnist/teacher --lr 2e-5 --gen-every 5 --batch-size 32 --steps 5000 --max-minutes 3 --log-every 25 --probe-every 100 --sample-every 500 --ckpt-every 500 --ema 0.95"
run() { name=$1; shift; mkdir -p runs/ablate/$name; cp -r runs/mnist/classifier runs/ablate/$name/;
        .venv/bin/python distill.py --run-dir runs/ablate/$name $BASE "$@" --overwrite > runs/ablate/$name.log 2>&1; }
run base --pairs runs/mnist/pairs --guidance 3
.venv/bin/python precompute.py --run-dir runs/ablate/s2 --teacher runs/mnist/teacher --num-pairs 1024 --sampling-steps 25 --guidance 2 > runs/ablate/pairs_s2.log 2>&1
run guidance2 --pairs runs/ablate/s2/pairs --guidance 2
run seed_lr --pairs runs/mnist/pairs --guidance 3 --lr 5e-6
run one_to_one --pairs runs/mnist/pairs --guidance 3 --gen-every 1
run no_dm --pairs runs/mnist/pairs --guidance 3 --dm-weight 0
echo ALL DONE > runs/ablate/done
