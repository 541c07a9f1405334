"""What the benchmarks build and how they measure: the teachers' real architectures with random weights (timing does
not depend on the weights), the DMD networks and step of dmd.py, wall-clock timers and peak memory.

Memory is CUDA max-allocated on a GPU; on the CPU, the peak resident set (VmHWM) of this process, read from Linux's
/proc (NaN elsewhere), counted from a baseline taken before a test builds its networks.
"""
import argparse
import ctypes
import gc
import os
import platform
import time

import torch
from accelerate import Accelerator

import dmd
from losses import pseudo_huber
from models import Denoiser, make_dmd_networks, make_teacher
from recipes import PRESETS, default_guidance

DEV = "cuda" if torch.cuda.is_available() else "cpu"
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
# The work
# ---------------------------------------------------------------------------------------------
def networks(dataset, n_feat=128):
    """The dataset's teacher (MNIST's ContextUnet at width `n_feat`: 128 the seed's, 32 the CPU demo's)."""
    backbone, scheduler = make_teacher(dataset, "epsilon", n_feat=n_feat)
    return Denoiser(backbone.eval(), scheduler).to(DEV)


def inputs(dataset, B):
    spec = PRESETS[dataset]
    z = torch.randn(B, *spec["shape"], device=DEV)
    y = torch.randint(0, spec["num_classes"], (B,), device=DEV) if spec["num_classes"] else None
    return z, y


@torch.no_grad()
def teacher_forward(den, z, y):
    """One teacher forward (the unit of the DMD step's cost), at a mid-range t."""
    return den(z, torch.full((len(z),), 100, device=DEV), y)


class DMDStep:
    """One step of dmd.py with distill.py's defaults (µreal guided by recipes.default_guidance, the regression loss
    on a batch of pairs, pseudo-Huber as where LPIPS's trunk cannot be downloaded), with `den` (a teacher) as µbase.
    `extra` are distill.py flags, e.g. ["--reg-weight", "0"] or ["--gan-weight", "3e-2"]."""

    def __init__(self, den, B, extra=()):
        self.shape, self.num_classes, self.dev = den.shape, den.num_classes, DEV
        flags = dmd.add_arguments(argparse.ArgumentParser()).parse_args(list(extra))
        self.args = dmd.StepConfig.from_args(flags, batch_size=B, seed=0, guidance=default_guidance(den.null_label is not None))
        net_g, mu_real, mu_fake = make_dmd_networks(den.backbone, den.schedule.scheduler, gan_head=self.args.gan_weight > 0,
                                                    head_input=flags.gan_head_input)
        self.nets = dmd.Networks(net_g.to(DEV), mu_real.to(DEV), mu_fake.to(DEV), pseudo_huber)
        self.opt_g = torch.optim.AdamW(net_g.parameters(), 1e-6)
        self.opt_fake = torch.optim.AdamW(mu_fake.parameters(), 1e-6)
        self.pairs = None if self.args.reg_weight == 0 else (
            torch.randn(B, *self.shape), torch.rand(B, *self.shape) * 2 - 1,
            torch.arange(B) % self.num_classes if self.num_classes else None, None)
        labels = torch.arange(2 * B) % self.num_classes if self.num_classes else torch.zeros(2 * B, dtype=torch.long)
        self.real = (torch.utils.data.TensorDataset(torch.rand(2 * B, *self.shape) * 2 - 1, labels)
                     if dmd.needs_real_images(self.args) else None)  # GAN head / K-step inputs: random "real" images
        self.accelerator = Accelerator(cpu=DEV == "cpu")
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, step=0):
        """One whole step: by default step 0 of --gen-every, the generator update included; others of the cycle only
        update µfake."""
        b = dmd.draw_batch(self.gen, step, self.args, self.shape, self.num_classes, self.nets.net_g.T, self.pairs,
                           self.real, device=self.dev)
        dmd.dmd_step(step, self.nets, self.opt_g, self.opt_fake, b, self.args, self.accelerator)
        sync()


def teacher_train_step(den, opt, x0, y):
    t = torch.randint(0, den.T, (len(x0),), device=DEV)
    eps = torch.randn_like(x0)
    torch.nn.functional.mse_loss(den(den.add_noise(x0, eps, t), t, y), den.target(x0, eps, t)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Memory: CUDA's allocator counts tensors exactly; on the CPU, the peak resident set (VmHWM) of this process
# ---------------------------------------------------------------------------------------------
def proc_status_bytes(key):
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def release_freed():
    """Drop garbage; on the CPU also hand freed heap back to the OS (glibc keeps it, all the more under
    cli.keep_freed_memory), so that RSS counts live memory and the work measured next cannot hide its use in
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
