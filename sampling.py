"""Samplers: the teacher's multi-step DDIM / DDPM, the one-step generator, and seeded inputs.

Sample i always uses noise seed `seed + i` and (class-conditional) label `i % num_classes`, so an image never
depends on the batch size or the number of processes, and every model can be scored on the same inputs.

Each use of seeded noise has its own range of seeds, so that no reported number is measured on a training input:
the pairs use seed .. seed + num_pairs (precompute.py --seed, default 0), the sample grids GRID_SEED.., distill.py's
probe PROBE_SEED.., and evaluation EVAL_SEED.. (evaluate.py refuses seeds that overlap the pairs' or the probe's).
"""
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm import tqdm

GRID_SEED, PROBE_SEED, EVAL_SEED = 10 ** 6, 2 * 10 ** 6, 10 ** 7


@torch.no_grad()
def sample_teacher(denoiser, z, y=None, steps=25, s=1.0, ddpm=False, generator=None, progress=False):
    """Multi-step sampling from x_T = z with diffusers' schedulers on the teacher's own schedule.
    DDIM (eta = 0, deterministic; "trailing" spacing so the first step is t = T-1, where x_T = z lives;
    x̂0 clipped to [-1, 1] as the scheduler config says, and ε̂ recomputed from the clipped x̂0)
    or full ancestral DDPM (`ddpm=True`, every one of the T steps; randomness from `generator`)."""
    if ddpm:
        sched = DDPMScheduler.from_config(denoiser.scheduler_config)
        sched.set_timesteps(denoiser.T)
    else:
        sched = DDIMScheduler.from_config(denoiser.scheduler_config, timestep_spacing="trailing")
        sched.set_timesteps(steps)
    x = z
    for t in (tqdm(sched.timesteps, desc="sampling", leave=False) if progress else sched.timesteps):
        out = denoiser.guided(x, t.to(z.device), y, s)
        # use_clipped_model_output: with clip_sample, take ε̂ from the clipped x̂0, else guided steps diverge
        x = (sched.step(out, t, x, generator=generator) if ddpm else
             sched.step(out, t, x, eta=0.0, use_clipped_model_output=True)).prev_sample
    return x


def seeded_noise(indices, shape, seed):
    """z_i ~ N(0, I) from its own generator seeded seed + i: sample i never depends on batch or process."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + int(i))) for i in indices])


def balanced_labels(indices, num_classes):
    """Label i % num_classes (balanced classes); None for unconditional teachers."""
    return torch.as_tensor(indices, dtype=torch.long) % num_classes if num_classes else None


def one_step(denoiser, z, y=None, s=1.0):
    """The generator G(z, y): x̂0 of the network at t_gen = T-1 with x_t = z ~ N(0, I). One evaluation (two when
    guided: the one-step teacher with guidance s)."""
    return denoiser.x0(z, denoiser.T - 1, y, s)


@torch.no_grad()
def generate(den, sample, indices, seed, batch_size, device="cpu", desc="sampling"):
    """Images in [-1, 1] (CPU), labels (or None) and seconds per batch for sample indices: noise seed+i, label
    i % num_classes. `sample(z, y, generator)` makes a batch: one_step, sample_teacher, ... (`generator` for
    samplers that draw noise along the way, seeded by the batch's first sample)."""
    images, labels, seconds = [], [], []
    indices = list(indices)
    shape = (den.backbone.config.in_channels, *(den.backbone.config.sample_size,) * 2)
    for i in tqdm(range(0, len(indices), batch_size), desc=desc, leave=False):
        idx = indices[i:i + batch_size]
        z, y = seeded_noise(idx, shape, seed).to(device), balanced_labels(idx, den.num_classes)
        y_dev = y.to(device) if y is not None else None
        sync(device)
        t0 = time.perf_counter()
        x = sample(z, y_dev, torch.Generator(device).manual_seed(seed + idx[0]))
        sync(device)
        seconds.append(time.perf_counter() - t0)
        images.append(x.float().cpu())
        labels.append(y)
    return torch.cat(images), (torch.cat(labels) if den.num_classes else None), seconds


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
