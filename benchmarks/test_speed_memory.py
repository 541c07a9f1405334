"""Latency and memory of the one-step generator vs the multi-step teacher, and of one DMD step.

    pytest benchmarks --benchmark-only [--benchmark-json out.json]

Real architectures of the three teachers with random weights (timing does not depend on the weights).
The teacher's full T-step latency is measured on a few steps and scaled to T (said in extra_info).
Memory: CUDA max allocated on a GPU; on the CPU, the peak RSS of a fresh process running the same work once
(minus that process's RSS before it), labelled `cpu_peak_rss`.
"""
import os
import subprocess
import sys

import pytest
import torch

from losses import denoising_loss, dm_loss, dm_timesteps, pseudo_huber
from models import DATASETS, Denoiser, make_dmd_networks, make_teacher, one_step

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CPU_SCALED_STEPS = 2  # teacher steps measured on the CPU, then scaled to T
GPU_SCALED_STEPS = 50


def device_name():
    if DEV == "cuda":
        return torch.cuda.get_device_name()
    import platform
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def networks(dataset):
    backbone, scheduler = make_teacher(dataset, "epsilon")
    return Denoiser(backbone.eval(), scheduler).to(DEV)


def dmd_networks(den, dataset):
    return tuple(n.to(DEV) for n in make_dmd_networks(den.backbone, make_teacher(dataset)[1]))


def inputs(dataset, B):
    spec = DATASETS[dataset]
    z = torch.randn(B, *spec["shape"], device=DEV)
    y = torch.randint(0, spec["num_classes"], (B,), device=DEV) if spec["num_classes"] else None
    return z, y


def teacher_steps(den, z, y, n):
    """n guided-or-not denoiser evaluations at decreasing t: the cost of n sampler steps."""
    x = z
    for t in torch.linspace(den.T - 1, 0, n).long().tolist():
        x = den.x0(x, t, y)
    return x


def distill_step(net_g, mu_real, mu_fake, opt_g, opt_fake, z, y, z_ref, x_ref):
    """One DMD step as distill.py does it (generator update + µfake update), without the logging."""
    B, T = len(z), net_g.T
    x_all = one_step(net_g, torch.cat([z, z_ref]), torch.cat([y, y]) if y is not None else None)
    x, x_reg = x_all[:B], x_all[B:]
    t = dm_timesteps(B, T).to(DEV)
    x_t = net_g.add_noise(x.detach(), torch.randn_like(x), t)
    with torch.no_grad():
        p_real, p_fake = mu_real.x0(x_t, t, y), mu_fake.x0(x_t, t, y)
    loss_g = dm_loss(x, p_real, p_fake)[0] + 0.25 * pseudo_huber(x_reg, x_ref)
    loss_g.backward()
    opt_g.step()
    opt_g.zero_grad(set_to_none=True)
    t = torch.randint(0, T, (B,), device=DEV)
    eps = torch.randn_like(x)
    x_t = mu_fake.add_noise(x.detach(), eps, t)
    denoising_loss(mu_fake(x_t, t, y), mu_fake.target(x.detach(), eps, t)).backward()
    opt_fake.step()
    opt_fake.zero_grad(set_to_none=True)


def teacher_train_step(den, opt, x0, y):
    t = torch.randint(0, den.T, (len(x0),), device=DEV)
    eps = torch.randn_like(x0)
    denoising_loss(den(den.add_noise(x0, eps, t), t, y), den.target(x0, eps, t)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_case(case, dataset, B):
    """Run one case once (after a warm-up on CUDA) and return the peak memory in MB of that work."""
    den = networks(dataset)
    z, y = inputs(dataset, B)
    if case == "distill":
        net_g, mu_real, mu_fake = dmd_networks(den, dataset)
        opt_g = torch.optim.AdamW(net_g.parameters(), 1e-6)
        opt_fake = torch.optim.AdamW(mu_fake.parameters(), 1e-6)
        fn = lambda: distill_step(net_g, mu_real, mu_fake, opt_g, opt_fake, z, y, z, torch.zeros_like(z))  # noqa: E731
    elif case == "teacher_train":
        den.train()
        opt = torch.optim.AdamW(den.parameters(), 1e-6)
        fn = lambda: teacher_train_step(den, opt, z, y)  # noqa: E731
    elif case == "onestep":
        fn = lambda: torch.no_grad()(one_step)(den, z, y)  # noqa: E731
    else:  # teacher sampling, a couple of steps
        fn = lambda: torch.no_grad()(teacher_steps)(den, z, y, CPU_SCALED_STEPS)  # noqa: E731
    if DEV == "cuda":
        fn()  # warm-up (cuDNN autotuning, allocator)
        sync()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so the peak below belongs to fn() alone.
    # (ru_maxrss is the lifetime peak: building the networks had already set it, and the first run read 0 MB.)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status_kb("VmRSS")
    fn()
    return (proc_status_kb("VmHWM") - before) / 1024


def proc_status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def peak_mem(case, dataset, B):
    """(MB, kind): on CUDA in-process; on the CPU in a fresh process so the peak belongs to this work alone."""
    if DEV == "cuda":
        return run_case(case, dataset, B), "cuda_max_allocated"
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}); "
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import test_speed_memory as b; print(b.run_case({case!r}, {dataset!r}, {B}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1]), "cpu_peak_rss"


def timed(benchmark, fn, rounds):
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1 if DEV == "cuda" or rounds > 1 else 0, iterations=1)
    return benchmark.stats.stats.median


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("B", [1, 64])
def test_onestep_vs_teacher_latency(benchmark, dataset, B):
    den = networks(dataset)
    z, y = inputs(dataset, B)
    steps = GPU_SCALED_STEPS if DEV == "cuda" else CPU_SCALED_STEPS
    with torch.no_grad():
        import time
        teacher_times = []
        for _ in range(3):  # the teacher's few steps, timed beside the one-step generator in the same process
            sync()
            t0 = time.perf_counter()
            teacher_steps(den, z, y, steps)
            sync()
            teacher_times.append(time.perf_counter() - t0)
        teacher_full = sorted(teacher_times)[1] / steps * den.T  # median, scaled to all T steps

        def fn():
            one_step(den, z, y)
            sync()
        median = timed(benchmark, fn, rounds=10 if B == 1 else 3)
    mem, kind = peak_mem("onestep", dataset, B)
    benchmark.extra_info.update(dataset=dataset, batch=B, device=device_name(), ms_per_image=1000 * median / B,
                                teacher_ms_per_image=1000 * teacher_full / B, teacher_steps=den.T,
                                teacher_measured_steps=steps, teacher_scaled=True,
                                speedup_vs_teacher=teacher_full / median, peak_mem_mb=mem, mem_kind=kind)


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_distill_step(benchmark, dataset):
    B = 64
    den = networks(dataset)
    z, y = inputs(dataset, B)
    net_g, mu_real, mu_fake = dmd_networks(den, dataset)
    opt_g, opt_fake = torch.optim.AdamW(net_g.parameters(), 1e-6), torch.optim.AdamW(mu_fake.parameters(), 1e-6)
    import time
    with torch.no_grad():
        fwd = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            mu_real(z, torch.full((B,), 100, device=DEV), y)
            sync()
            fwd.append(time.perf_counter() - t0)

    def fn():
        distill_step(net_g, mu_real, mu_fake, opt_g, opt_fake, z, y, z, torch.zeros_like(z))
        sync()
    median = timed(benchmark, fn, rounds=3 if DEV == "cuda" else 1)  # a CIFAR-10 step takes about a minute on 2 cores
    mem, kind = peak_mem("distill", dataset, B)
    train_mem, _ = peak_mem("teacher_train", dataset, B)
    benchmark.extra_info.update(dataset=dataset, batch=B, device=device_name(), step_ms=1000 * median,
                                teacher_forward_ms=1000 * sorted(fwd)[1], step_vs_teacher_forward=median / sorted(fwd)[1],
                                peak_mem_mb=mem, mem_kind=kind, teacher_train_step_peak_mem_mb=train_mem,
                                mem_vs_teacher_train_step=mem / max(train_mem, 1e-9))
