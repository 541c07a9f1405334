"""Latency and memory of the one-step generator vs the multi-step teacher, and of one DMD step.

    pytest benchmarks --benchmark-only [--benchmark-json out.json]

Real architectures of the three teachers with random weights (timing does not depend on the weights).
The teacher's full T-step latency is measured on a few steps and scaled to T (said in extra_info). Its steps are
timed in the `setup` of every benchmark round, so on a noisy machine drift hits both sides of a ratio alike.
Memory is the peak while the work runs, its first call included (it doubles as the warm-up and makes AdamW's
state), above what the process held before the test built its networks: CUDA max allocated on a GPU, peak RSS on the
CPU (labelled `cpu_peak_rss`).
"""
import ctypes
import gc
import os
import platform
import statistics
import time

import pytest
import torch

from losses import denoising_loss, dm_loss, dm_timesteps, pseudo_huber
from diffusers import DDPMScheduler

from models import DATASETS, Denoiser, make_dmd_networks, make_teacher, one_step

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TEACHER_STEPS = 50 if DEV == "cuda" else 2  # teacher steps timed per round, then scaled to T
GUIDANCE = 2.0  # distill.py's default guidance for µreal of a class-conditional teacher (MNIST)
SLOW_S = 30  # a DMD step expected to take longer (CIFAR-10 on a small CPU) is timed once after the warm-up
LINUX_RSS = os.path.exists("/proc/self/clear_refs")  # CPU memory is read from /proc; elsewhere it is reported as NaN


def device_name():
    return torch.cuda.get_device_name() if DEV == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def timer(fn, out):
    """fn, wrapped to append its wall time in seconds to `out`."""
    def timed():
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return timed


# ---------------------------------------------------------------------------------------------
# Memory: CUDA's allocator counts tensors exactly; on the CPU, the peak resident set (VmHWM) of this process
# ---------------------------------------------------------------------------------------------
def proc_status_bytes(key):
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def release_freed():
    """Drop garbage; on the CPU also hand freed heap back to the OS (glibc keeps it, all the more under
    models.keep_freed_memory), so that RSS counts live memory and the work measured next cannot hide its use in
    memory an earlier test freed."""
    gc.collect()
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    elif LINUX_RSS:
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def mem_baseline():
    """Bytes held before a test builds its networks."""
    release_freed()
    if DEV == "cuda":
        return torch.cuda.memory_allocated()
    return proc_status_bytes("VmRSS") if LINUX_RSS else float("nan")


class PeakMemory:
    """`with PeakMemory(base) as m:` ... then m.mb = the peak in MB above `base` while the block ran, m.kind = what
    was measured."""

    def __init__(self, base):
        self.base, self.kind = base, "cuda_max_allocated" if DEV == "cuda" else "cpu_peak_rss"

    def __enter__(self):
        release_freed()
        if DEV == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elif LINUX_RSS:
            with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current RSS
                f.write("5")
        return self

    def __exit__(self, *exc):
        sync()
        peak = torch.cuda.max_memory_allocated() if DEV == "cuda" else proc_status_bytes("VmHWM") if LINUX_RSS else self.base
        self.mb = (peak - self.base) / 2 ** 20


# ---------------------------------------------------------------------------------------------
# The work
# ---------------------------------------------------------------------------------------------
def networks(dataset):
    backbone, scheduler = make_teacher(dataset, "epsilon")
    return Denoiser(backbone.eval(), scheduler).to(DEV)


def inputs(dataset, B):
    spec = DATASETS[dataset]
    z = torch.randn(B, *spec["shape"], device=DEV)
    y = torch.randint(0, spec["num_classes"], (B,), device=DEV) if spec["num_classes"] else None
    return z, y


@torch.no_grad()
def teacher_forward(den, z, y):
    """One teacher forward (the unit of the DMD step's cost), at a mid-range t."""
    return den(z, torch.full((len(z),), 100, device=DEV), y)


def dmd_setup(den):
    """netG, µreal, µfake (µreal is den's backbone) and the two AdamW optimisers, as distill.py makes them."""
    net_g, mu_real, mu_fake = make_dmd_networks(den.backbone, DDPMScheduler.from_config(den.scheduler_config))
    net_g, mu_real, mu_fake = net_g.to(DEV), mu_real.to(DEV), mu_fake.to(DEV)
    return net_g, mu_real, mu_fake, torch.optim.AdamW(net_g.parameters(), 1e-6), torch.optim.AdamW(mu_fake.parameters(), 1e-6)


def teacher_steps(den, z, y, n):
    """n denoiser evaluations at decreasing t: the cost of n sampler steps (without guidance: NFE = T)."""
    x = z
    for t in torch.linspace(den.T - 1, 0, n).long().tolist():
        x = den.x0(x, t, y)
    return x


def distill_step(net_g, mu_real, mu_fake, opt_g, opt_fake, z, y, z_ref, x_ref, tick=lambda phase: None):
    """One DMD step as distill.py does it with its defaults (generator update with guided µreal, then µfake update).
    `tick(phase)` is called at the end of each phase (benchmarks/step_breakdown.py times them)."""
    B, T = len(z), net_g.T
    x_all = one_step(net_g, torch.cat([z, z_ref]), torch.cat([y, y]) if y is not None else None)
    x, x_reg = x_all[:B], x_all[B:]
    tick("netG forward, 2B images (fresh + regression batch)")
    t = dm_timesteps(B, T).to(DEV)
    x_t = net_g.add_noise(x.detach(), torch.randn_like(x), t)
    with torch.no_grad():
        p_real = mu_real.x0(x_t, t, y, GUIDANCE if y is not None else 1.0)
        tick("µreal forward" + (", guided (2B)" if y is not None else ""))
        p_fake = mu_fake.x0(x_t, t, y)
        tick("µfake forward")
    loss_g = dm_loss(x, p_real, p_fake)[0] + 0.25 * pseudo_huber(x_reg, x_ref)
    loss_g.backward()
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    tick("netG backward (2B) + AdamW")
    t = torch.randint(0, T, (B,), device=DEV)
    eps = torch.randn_like(x)
    x_t = mu_fake.add_noise(x.detach(), eps, t)
    raw = mu_fake(x_t, t, y)
    tick("µfake forward with grad")
    denoising_loss(raw, mu_fake.target(x.detach(), eps, t)).backward()
    opt_fake.step()
    opt_fake.zero_grad(set_to_none=True)
    tick("µfake backward + AdamW")


def teacher_train_step(den, opt, x0, y):
    t = torch.randint(0, den.T, (len(x0),), device=DEV)
    eps = torch.randn_like(x0)
    denoising_loss(den(den.add_noise(x0, eps, t), t, y), den.target(x0, eps, t)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", list(DATASETS))
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


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_distill_step(benchmark, dataset):
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
    net_g, mu_real, mu_fake, opt_g, opt_fake = dmd_setup(den)
    forward = []
    # A DMD step costs about five teacher training steps. Where that is minutes (CIFAR-10 on a small CPU), one step
    # after the warm-up is timed, to keep the suite under 10 minutes. (Not the warm-up itself: first-call costs,
    # fresh memory and AdamW's state, made CIFAR-10's first step 15% slower than the next on the CPU.)
    slow = DEV == "cpu" and 5 * train[0] > SLOW_S
    with PeakMemory(base) as mem:  # every step of the benchmark, the first one (AdamW's states made) included
        benchmark.pedantic(lambda: (distill_step(net_g, mu_real, mu_fake, opt_g, opt_fake, z, y, z, torch.zeros_like(z)),
                                    sync()),
                           setup=timer(lambda: teacher_forward(mu_real, z, y), forward),
                           rounds=1 if slow else 3, warmup_rounds=1, iterations=1)
    median, fwd = benchmark.stats.stats.median, statistics.median(forward)
    benchmark.extra_info.update(dataset=dataset, batch=B, device=device_name(), step_ms=1000 * median,
                                teacher_forward_ms=1000 * fwd, step_vs_teacher_forward=median / fwd,
                                timed_rounds=len(benchmark.stats.stats.data),
                                peak_mem_mb=mem.mb, mem_kind=mem.kind, teacher_train_step_peak_mem_mb=train_mem.mb,
                                mem_vs_teacher_train_step=mem.mb / train_mem.mb)
