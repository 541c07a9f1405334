"""Latency and memory of the one-step generator vs the multi-step teacher, and of one DMD step.

    pytest benchmarks --benchmark-only [--benchmark-json out.json]

Real architectures of the three teachers with random weights (timing does not depend on the weights).
The teacher's full T-step latency is measured on a few steps and scaled to T (said in extra_info). Its steps are
timed in the `setup` of every benchmark round, so on a noisy machine drift hits both sides of a ratio alike.
Memory is the peak while the work runs, its first call included (it doubles as the warm-up and makes AdamW's
state), above what the process held before the test built its networks: CUDA max allocated on a GPU, peak RSS on the
CPU (labelled `cpu_peak_rss`).
"""
import statistics

import pytest
import torch
from measure import (DEV, DMDStep, PeakMemory, device_name, inputs, mem_baseline, networks, sync, teacher_forward,
                     teacher_train_step, timer)

from recipes import PRESETS
from sampling import one_step

TEACHER_STEPS = 50 if DEV == "cuda" else 2  # teacher steps timed per round, then scaled to T
SLOW_S = 30  # a DMD step expected to take longer (CIFAR-10 on a small CPU) is timed once after the warm-up


def teacher_steps(den, z, y, n):
    """n denoiser evaluations at decreasing t: the cost of n sampler steps (without guidance: NFE = T)."""
    x = z
    for t in torch.linspace(den.T - 1, 0, n).long().tolist():
        x = den.x0(x, t, y)
    return x


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", [name for name in PRESETS if name != "custom"])
@pytest.mark.parametrize("B", [1, 64])
@torch.no_grad()
def test_onestep_vs_teacher_latency(benchmark, dataset, B):
    base = mem_baseline()
    den = networks(dataset)
    z, y = inputs(dataset, B)
    with PeakMemory(base) as mem:
        one_step(den, z, y)  # also the warm-up
    teacher = []
    benchmark.pedantic(lambda: (one_step(den, z, y), sync()), rounds=10 if B == 1 else 3, iterations=1,
                       setup=timer(lambda: teacher_steps(den, z, y, TEACHER_STEPS), teacher))
    median = benchmark.stats.stats.median
    teacher_full = statistics.median(teacher) / TEACHER_STEPS * den.T
    benchmark.extra_info.update(dataset=dataset, batch=B, device=device_name(), ms_per_image=1000 * median / B,
                                teacher_ms_per_image=1000 * teacher_full / B, teacher_steps=den.T,
                                teacher_measured_steps=TEACHER_STEPS, teacher_scaled=True,
                                speedup_vs_teacher=teacher_full / median, peak_mem_mb=mem.mb, mem_kind=mem.kind)


DMD_STEPS = [(dataset, "dmd") for dataset in PRESETS if dataset != "custom"] + [("mnist", "dmd2-no-gan")]
RECIPES = {"dmd": [], "dmd2-no-gan": ["--reg-weight", "0"]}  # with pairs (DMD's default); no pairs, no GAN term


@pytest.mark.parametrize("dataset, recipe", DMD_STEPS)
def test_distill_step(benchmark, dataset, recipe):
    B = 64
    base = mem_baseline()
    den = networks(dataset)
    z, y = inputs(dataset, B)
    opt = torch.optim.AdamW(den.train().parameters(), 1e-6)
    train = []
    with PeakMemory(base) as train_mem:  # AdamW's state is made in the first step: counted
        timer(lambda: teacher_train_step(den, opt, z, y), train)()
    opt = None  # frees AdamW's state before the DMD networks are built
    den.eval()
    step = DMDStep(den, B, RECIPES[recipe])
    forward = []
    # A DMD step costs about five teacher training steps. Where that is minutes (CIFAR-10 on a small CPU), one step
    # after the warm-up is timed, to keep the suite under 10 minutes. (Not the warm-up itself: first-call costs,
    # fresh memory and AdamW's state, made CIFAR-10's first step 15% slower than the next on the CPU.)
    slow = DEV == "cpu" and 5 * train[0] > SLOW_S
    with PeakMemory(base) as mem:  # every step of the benchmark, the first one (AdamW's states made) included
        benchmark.pedantic(step, setup=timer(lambda: teacher_forward(den, z, y), forward),
                           rounds=1 if slow else 3, warmup_rounds=1, iterations=1)
    median, fwd = benchmark.stats.stats.median, statistics.median(forward)
    benchmark.extra_info.update(dataset=dataset, recipe=recipe, batch=B, device=device_name(), step_ms=1000 * median,
                                teacher_forward_ms=1000 * fwd, step_vs_teacher_forward=median / fwd,
                                timed_rounds=len(benchmark.stats.stats.data),
                                peak_mem_mb=mem.mb, mem_kind=mem.kind, teacher_train_step_peak_mem_mb=train_mem.mb,
                                mem_vs_teacher_train_step=mem.mb / train_mem.mb)


# The CPU demo's step (the Makefile's DISTILL_FLAGS, less the loop's flags): DMD2 with the GAN head on the down path.
DEMO = ["--reg-weight", "0", "--gen-every", "5", "--gan-weight", "3e-2", "--gan-disc-weight", "1e-1",
        "--gan-head-input", "down"]


@pytest.mark.parametrize("generator_loss", ["dmd", "sid"])
def test_generator_loss_step(benchmark, generator_loss):
    """DMD2's generator loss against SiD's at the CPU demo's settings (MNIST ContextUnet, n_feat 32, batch 32, the
    demo's flags; with its GAN head on, SiD is SiDA). Timed: one whole --gen-every cycle, the generator update's step
    and the 4 that only update µfake (the same for both losses), with the generator update's step also timed alone;
    a teacher forward is timed between the rounds as the unit: compare the two rows in it. Memory: the peak over the
    cycles, the generator update (where SiD keeps µreal's and µfake's activations for its backward) included."""
    B = 32
    base = mem_baseline()
    den = networks("mnist", n_feat=32)
    z, y = inputs("mnist", B)
    step = DMDStep(den, B, [*DEMO, "--generator-loss", generator_loss])
    g_steps, forward = [], []

    def cycle():
        timer(step, g_steps)()  # step 0: the generator update, then µfake's
        for i in range(1, step.args.gen_every):
            step(i)
    with PeakMemory(base) as mem:
        benchmark.pedantic(cycle, setup=timer(lambda: teacher_forward(den, z, y), forward), rounds=3, warmup_rounds=1,
                           iterations=1)
    cycle_s, fwd, g_step = benchmark.stats.stats.median, statistics.median(forward), statistics.median(g_steps[1:])
    benchmark.extra_info.update(dataset="mnist", n_feat=32, generator_loss=generator_loss, batch=B, device=device_name(),
                                gen_every=step.args.gen_every, ms_per_step=1000 * cycle_s / step.args.gen_every,
                                g_step_ms=1000 * g_step, teacher_forward_ms=1000 * fwd,
                                per_step_vs_teacher_forward=cycle_s / step.args.gen_every / fwd,
                                g_step_vs_teacher_forward=g_step / fwd, peak_mem_mb=mem.mb, mem_kind=mem.kind)
