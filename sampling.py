"""Samplers: the teacher's multi-step DDIM / DDPM, the one-step generator, and seeded inputs.

Sample i always uses noise seed `seed + i` and (class-conditional) label `i % num_classes`, so an image never
depends on the batch size or the number of processes, and every model can be scored on the same inputs.

Each use of seeded noise has its own range of seeds, so that no reported number is measured on a training input:
the pairs use seed .. seed + num_pairs (precompute.py --seed, default 0), the sample grids GRID_SEED.., distill.py's
probe PROBE_SEED.., and evaluation EVAL_SEED.. (evaluate.py refuses seeds that overlap the pairs' or the probe's).
"""
import time

import torch
from diffusers import DDPMScheduler

import cli

GRID_SEED, PROBE_SEED, EVAL_SEED = 10 ** 6, 2 * 10 ** 6, 10 ** 7


@torch.no_grad()
def sample_teacher(denoiser, z, y=None, steps=25, s=1.0, ddpm=False, generator=None, progress=False, states_at=None,
                   guidance_t_max=1.0):
    """Multi-step sampling from x_T = z with diffusers' schedulers on the teacher's own schedule (schedules.py):
    the deterministic sampler on `steps` timesteps with "trailing" spacing, so the first step is t = T-1, where
    x_T = z lives (DDPM family: DDIM, eta = 0, x̂0 clipped to [-1, 1] as the scheduler config says and ε̂ recomputed
    from the clipped x̂0; flow matching: Euler on the probability-flow ODE), or full ancestral DDPM (`ddpm=True`,
    every one of the T steps, randomness from `generator`; DDPM teachers only).
    states_at: a dict {timestep: None} that gets, for each of its timesteps, the state x_t the step at t starts from.
    guidance_t_max: guidance s only at the steps with t <= this x T, none above (distill.py's µreal has the same switch)."""
    if ddpm:
        if denoiser.schedule.kind != "ddpm":
            raise cli.UserError("full ancestral DDPM sampling (--full-ddpm) is for DDPM teachers; a flow-matching "
                                "teacher's multi-step sampler is its Euler ODE: drop --full-ddpm")
        sched = DDPMScheduler.from_config(denoiser.schedule.scheduler.config)
        sched.set_timesteps(denoiser.T)
        timesteps = [int(t) for t in sched.timesteps]

        def step(out, i, x):
            return sched.step(out, sched.timesteps[i], x, generator=generator).prev_sample
    else:
        timesteps, step = denoiser.schedule.sampling_timesteps(steps), denoiser.schedule.sampler(steps)
    x = z
    for i, t in enumerate(cli.progress(timesteps, desc="sampling", leave=False) if progress else timesteps):
        if states_at is not None and t in states_at:
            states_at[t] = x
        out = denoiser.guided(x, torch.tensor(t, device=z.device), y, s if t <= guidance_t_max * denoiser.T else 1.0)
        x = step(out, i, x)
    return x


def seeded_noise(indices, shape, seed, draws=1):
    """z_i ~ N(0, I) from its own generator seeded seed + i: sample i never depends on batch or process.
    (B, *shape); with draws > 1, (draws, B, *shape): draw d of sample i is the d-th draw of that same generator
    (z, then the K-step generator's re-noising), as a diffusers pipeline with that generator would draw them."""
    gens = [torch.Generator().manual_seed(seed + int(i)) for i in indices]
    noise = torch.stack([torch.stack([torch.randn(shape, generator=g) for _ in range(draws)]) for g in gens], dim=1)
    return noise[0] if draws == 1 else noise


def balanced_labels(indices, num_classes):
    """Label i % num_classes (balanced classes); None for unconditional teachers."""
    return torch.as_tensor(indices, dtype=torch.long) % num_classes if num_classes else None


def one_step(denoiser, z, y=None, s=1.0):
    """The generator G(z, y): x̂0 of the network at t_gen = T-1 with x_t = z ~ N(0, I). One evaluation (two when
    guided: the one-step teacher with guidance s)."""
    return denoiser.x0(z, denoiser.T - 1, y, s)


def generator_timesteps(T, K):
    """The K-step generator's timesteps, evenly spaced from T-1: t_k = (K - k) (T // K) - 1, k = 0..K-1. DMD2's
    999, 749, 499, 249 for T = 1000 and K = 4; the same as diffusers' LCMScheduler with original_inference_steps K.
    K = 1: T-1, the one-step generator."""
    if T % K:
        raise cli.UserError(f"--generator-steps {K} does not divide the teacher's {T} timesteps, so the steps cannot be "
                            f"evenly spaced from {T - 1}: pick a divisor of {T} (DMD2: 4 on T = 1000)")
    return [(K - k) * (T // K) - 1 for k in range(K)]


@torch.no_grad()
def sample_generator(den, noise, y, timesteps, every_step=False):
    """The K-step generator (K = len(timesteps)): x = z; for each step x̂0 = G(x, t_k, y), then x = the x̂0 noised to
    t_{k+1} with fresh noise (DMD2); the last x̂0 is the image. K network evaluations.
    noise: (B, C, H, W) for K = 1, else (K, B, C, H, W) = z then the re-noising draws (seeded_noise(..., draws=K)).
    every_step: return the list of every step's x̂0 (the training probe scores each)."""
    noise = noise[None] if noise.dim() == 4 else noise
    x, x0s = noise[0], []
    for k, t in enumerate(timesteps):
        t = torch.full((len(x),), t, device=x.device)
        x0s.append(den.x0(x, t, y))
        if k + 1 < len(timesteps):
            x = den.add_noise(x0s[-1], noise[k + 1], torch.full_like(t, timesteps[k + 1]))
    return x0s if every_step else x0s[-1]


@torch.no_grad()
def generate(den, sample, indices, seed, batch_size, device="cpu", desc="sampling", draws=1):
    """Images in [-1, 1] (CPU; a latent teacher's decoded), labels (or None) and seconds per batch for sample indices:
    noise seed+i (`draws` draws of it, for the K-step generator), label i % num_classes. `sample(noise, y, generator)`
    makes a batch: one_step, sample_teacher, sample_generator (`generator` for samplers that draw noise along the way,
    seeded by the batch's first sample)."""
    images, labels, seconds = [], [], []
    indices = list(indices)
    shape = den.shape
    for i in cli.progress(range(0, len(indices), batch_size), desc=desc, leave=False):
        idx = indices[i:i + batch_size]
        z, y = seeded_noise(idx, shape, seed, draws).to(device), balanced_labels(idx, den.num_classes)
        y_dev = y.to(device) if y is not None else None
        sync(device)
        t0 = time.perf_counter()
        x = den.decode(sample(z, y_dev, torch.Generator(device).manual_seed(seed + idx[0])))  # images: a latent
        sync(device)  # teacher's decoded by its VAE (in the latency, as in its pipeline)
        seconds.append(time.perf_counter() - t0)
        images.append(x.float().cpu())
        labels.append(y)
    return torch.cat(images), (torch.cat(labels) if den.num_classes else None), seconds


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
