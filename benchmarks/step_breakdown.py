"""Where one DMD step's time goes, in teacher forwards (batch 64, real architectures, random weights).

    python benchmarks/step_breakdown.py --dataset mnist [--repeats 3]

The step is test_speed_memory.distill_step; each phase is timed on its own (synchronised on a GPU) and divided by
one teacher forward at the same batch, timed beside every step. Medians over the repeats, after one warm-up step.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
from models import DATASETS, number  # noqa: E402
from test_speed_memory import device_name, distill_step, dmd_setup, inputs, networks, sync, teacher_forward, timer  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--dataset", default="mnist", choices=list(DATASETS))
p.add_argument("--batch-size", type=number(int, 0), default=64, help="the benchmarks' batch")
p.add_argument("--repeats", type=number(int, 0), default=3, help="timed steps (a CIFAR-10 step takes minutes on a small CPU)")
args = p.parse_args()

den = networks(args.dataset)
z, y = inputs(args.dataset, args.batch_size)
net_g, mu_real, mu_fake, opt_g, opt_fake = dmd_setup(den)
phases, forwards = {}, []
clock = [0.0]


def tick(phase):
    sync()
    now = time.perf_counter()
    phases.setdefault(phase, []).append(now - clock[0])
    clock[0] = now


for i in range(args.repeats + 1):
    timer(lambda: teacher_forward(mu_real, z, y), forwards)()
    clock[0] = time.perf_counter()
    distill_step(net_g, mu_real, mu_fake, opt_g, opt_fake, z, y, z, torch.zeros_like(z), tick)
    if i == 0:  # the warm-up step: AdamW's states are made, allocator and kernels warm up
        phases.clear()
fwd = statistics.median(forwards[1:])
print(f"{args.dataset}, batch {args.batch_size}, {device_name()}: one teacher forward = {1000 * fwd:.1f} ms\n")
print("| phase | ms | teacher forwards |\n|---|---|---|")
for phase, times in phases.items():
    print(f"| {phase} | {1000 * statistics.median(times):.1f} | {statistics.median(times) / fwd:.2f} |")
total = sum(statistics.median(t) for t in phases.values())
print(f"| whole step | {1000 * total:.1f} | {total / fwd:.2f} |")
