"""Where one DMD step's time goes, in teacher forwards (batch 64, real architectures, random weights).

    python benchmarks/step_breakdown.py --dataset mnist [--repeats 3] [--reg-weight 0]

The step is dmd.dmd_step, the one distill.py runs; its phases are the `record_function` labels inside dmd.py, read
back with torch.profiler (device time on a GPU, CPU time on the CPU). Each is divided by one teacher forward at the
same batch, timed beside every step. Medians over the repeats, after one warm-up step. Flags after --dataset and
--repeats are passed to the DMD step as distill.py flags.
"""
import argparse
import os
import statistics
import sys

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
from cli import keep_freed_memory, number  # noqa: E402
from measure import DEV, DMDStep, device_name, inputs, networks, teacher_forward, timer  # noqa: E402
from recipes import PRESETS  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--dataset", default="mnist", choices=[name for name in PRESETS if name != "custom"])
p.add_argument("--batch-size", type=number(int, 0), default=64, help="the benchmarks' batch")
p.add_argument("--repeats", type=number(int, 0), default=3, help="timed steps (a CIFAR-10 step takes minutes on a small CPU)")
args, dmd_flags = p.parse_known_args()
keep_freed_memory()

den = networks(args.dataset)
z, y = inputs(args.dataset, args.batch_size)
step = DMDStep(den, args.batch_size, dmd_flags)
phases, forwards, wholes = {}, [], []
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
for i in range(args.repeats + 1):
    timer(lambda: teacher_forward(den, z, y), forwards)()
    with profile(activities=activities) as prof:
        timer(step, wholes)()
    if i == 0:  # the warm-up step: AdamW's states are made, allocator and kernels warm up
        continue
    for e in prof.key_averages():
        if e.key.startswith(("netG", "µ")):  # dmd.py's record_function labels
            us = e.device_time_total if DEV == "cuda" else e.cpu_time_total
            phases.setdefault(e.key, []).append(us / 1e6)
fwd = statistics.median(forwards[1:])
print(f"{args.dataset}, batch {args.batch_size}, {device_name()}, flags {' '.join(dmd_flags) or '(defaults)'}: "
      f"one teacher forward = {1000 * fwd:.1f} ms\n")
print("| phase | ms | teacher forwards |\n|---|---|---|")
for phase, times in phases.items():
    print(f"| {phase} | {1000 * statistics.median(times):.1f} | {statistics.median(times) / fwd:.2f} |")
whole = statistics.median(wholes[1:])
print(f"| whole step (wall clock, profiled) | {1000 * whole:.1f} | {whole / fwd:.2f} |")
