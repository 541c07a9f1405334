"""One DMD step, as named functions to hold against the algorithm box (docs/ALGORITHM.md):

    batch = draw_batch(...)                  # fresh z, y, t, ε (+ a batch of precomputed pairs)
    dmd_step(...):
        generator_update(...)                # every --gen-every steps: loss_G = loss_DM + λ_reg loss_reg -> netG
        fake_score_update(...)               # every step: µfake's denoising loss on G's (detached) images -> µfake

distill.py runs these in its loop; benchmarks/ time the very same functions. The method's knobs are declared here,
once (`add_arguments`), beside the code that reads them.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.profiler import record_function

from cli import number
from losses import denoising_loss, dm_loss, dm_timesteps
from models import Denoiser


def add_arguments(p):
    """The DMD step's hyperparameters (distill.py adds the loop's: lr, batch, steps, logging)."""
    p.add_argument("--gen-every", type=number(int, 0), default=1, help="netG update every N steps (1 = DMD, 5 = DMD2's two time-scale rule)")
    p.add_argument("--guidance", type=number(float, 0, inclusive=True), default=None, help="µreal's guidance scale; default the pairs' (they must match)")
    p.add_argument("--dm-weight", type=number(float, 0, inclusive=True), default=1.0, help="weight of the DM loss (0 = regression only, for ablations)")
    p.add_argument("--reg-weight", type=number(float, 0, inclusive=True), default=0.25, help="λ_reg on the regression loss (seed's α: 0.25)")
    p.add_argument("--reg-loss", default="lpips", choices=["lpips", "pseudo_huber", "l2"], help="regression distance (LPIPS at 224 as DMD)")
    p.add_argument("--huber-c", type=number(float, 0), default=0.03, help="pseudo-Huber c (on the per-pixel RMS scale)")
    p.add_argument("--t-min", type=number(float, 0, inclusive=True), default=0.02, help="DM loss t range, as a fraction of T (DMD2: 0.02)")
    p.add_argument("--t-max", type=number(float, 0), default=0.98, help="DM loss t range upper end (DMD2: 0.98)")
    p.add_argument("--fake-loss", default="native", choices=["native", "x0"], help="µfake objective: the teacher's own (ε or v) or the seed's x̂0 form")
    p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="max gradient norm, both networks")
    return p


@dataclass
class Networks:
    net_g: Denoiser  # the generator G: a copy of the teacher, read at t = T-1 (trained)
    mu_real: Denoiser  # the frozen teacher: the real score
    mu_fake: Denoiser  # the fake score: trained online on G's images
    regression: Callable  # the regression distance d(G(z_ref), x_ref): LPIPS, pseudo-Huber or L2
    net_g_ddp: Optional[nn.Module] = None  # net_g / mu_fake as accelerator.prepare wrapped them (gradients synced
    mu_fake_ddp: Optional[nn.Module] = None  # across processes); default the modules themselves

    def __post_init__(self):
        self.net_g_ddp = self.net_g_ddp or self.net_g
        self.mu_fake_ddp = self.mu_fake_ddp or self.mu_fake


@dataclass
class Batch:
    """One step's random draws: this process's slice of the global batch (shapes B = per-process batch)."""
    z: torch.Tensor  # (B, C, H, W) noise, G's input
    y: Optional[torch.Tensor]  # (B,) labels for G, µreal and µfake; None for unconditional teachers
    t_dm: torch.Tensor  # (B,) the DM loss's timesteps
    eps_dm: torch.Tensor  # (B, C, H, W) the DM loss's noise
    t_fake: torch.Tensor  # (B,) µfake's training timesteps
    eps_fake: torch.Tensor  # (B, C, H, W) µfake's training noise
    z_ref: Optional[torch.Tensor] = None  # (B, C, H, W) a batch of precomputed pairs: noise,
    y_ref: Optional[torch.Tensor] = None  # label
    x_ref: Optional[torch.Tensor] = None  # and the teacher's image


def draw_batch(gen, step, args, shape, num_classes, T, pairs, rank=0, world=1, device="cpu"):
    """Every process draws the same GLOBAL batch from one generator `gen` and keeps the slice [rank::world], so N
    processes with batch B/N train exactly as one process with batch B, and resuming needs one generator state.
    Pairs are visited in a per-epoch permutation that is a function of (seed, epoch): resumable with no state.
    `pairs` = (noise, image, labels or None), or None when the regression loss is off."""
    Bg, mine = args.batch_size, slice(rank, None, world)

    def draw(x):
        return x[mine].to(device)
    b = Batch(z=draw(torch.randn((Bg, *shape), generator=gen)),
              y=draw(torch.randint(0, num_classes, (Bg,), generator=gen)) if num_classes else None,
              t_dm=draw(dm_timesteps(Bg, T, gen, args.t_min, args.t_max)),
              eps_dm=draw(torch.randn((Bg, *shape), generator=gen)),
              t_fake=draw(torch.randint(0, T, (Bg,), generator=gen)),
              eps_fake=draw(torch.randn((Bg, *shape), generator=gen)))
    if pairs is not None:
        z_pairs, x_pairs, y_pairs = pairs
        epoch, offset = divmod(step, len(z_pairs) // Bg)
        perm = torch.randperm(len(z_pairs), generator=torch.Generator().manual_seed(args.seed + epoch))
        idx = perm[offset * Bg:(offset + 1) * Bg][mine]
        b.z_ref, b.x_ref = z_pairs[idx].to(device), x_pairs[idx].to(device)
        b.y_ref = y_pairs[idx].to(device) if y_pairs is not None else None
    return b


def generator(nets, z, y):
    """G(z, y): one network evaluation, x̂0 of netG at t = T-1 from x_t = z (through the DDP wrapper, so that its
    gradients are synced across processes)."""
    T = nets.net_g.T
    return nets.net_g.to_x0(z, T - 1, nets.net_g_ddp(z, T - 1, y))


def generator_update(nets, opt_g, b, args, accelerator):
    """One netG update: loss_G = loss_DM + λ_reg loss_reg (docs/ALGORITHM.md, "Generator update").
    Returns G's images of the fresh batch (detached, for µfake's update) and the numbers to log."""
    B = len(b.z)
    with accelerator.autocast():
        with record_function("netG forward"):
            with_pairs = b.z_ref is not None
            z = torch.cat([b.z, b.z_ref]) if with_pairs else b.z  # fresh and regression batch in one forward
            y = torch.cat([b.y, b.y_ref]) if with_pairs and b.y is not None else b.y
            x_all = generator(nets, z, y)
            x, x_reg = x_all[:B], x_all[B:]
        with record_function("µreal and µfake score G's images"), torch.no_grad():
            x_t = nets.net_g.add_noise(x.detach(), b.eps_dm, b.t_dm)
            p_real = nets.mu_real.x0(x_t, b.t_dm, b.y, args.guidance)  # guided: the real score
            p_fake = nets.mu_fake.x0(x_t, b.t_dm, b.y)  # never guided
        loss_dm, w = dm_loss(x.float(), p_real.float(), p_fake.float())
        loss_reg = nets.regression(x_reg.float(), b.x_ref.float()) if with_pairs else torch.zeros(())
        loss_g = args.dm_weight * loss_dm + args.reg_weight * loss_reg
    check_finite(loss_g=loss_g, loss_dm=loss_dm, loss_reg=loss_reg)
    with record_function("netG backward + AdamW"):
        accelerator.backward(loss_g)
        grad = accelerator.clip_grad_norm_(nets.net_g_ddp.parameters(), args.grad_clip)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    return x.detach(), dict(loss_dm=loss_dm.item(), loss_reg=loss_reg.item(), loss_g=loss_g.item(), w=w.mean().item(),
                            grad_g=grad.item())


def fake_score_update(nets, opt_fake, x, b, args, accelerator):
    """One µfake update: the teacher's own denoising objective on G's detached images, never guided
    (docs/ALGORITHM.md, "Fake score update")."""
    with record_function("µfake forward with grad"), accelerator.autocast():
        x_t = nets.mu_fake.add_noise(x, b.eps_fake, b.t_fake)
        raw = nets.mu_fake_ddp(x_t, b.t_fake, b.y)
        if args.fake_loss == "x0":  # the seed's form: ||µfake_x̂0(x_t, t) - x||²
            loss_fake = denoising_loss(nets.mu_fake.to_x0(x_t, b.t_fake, raw), x)
        else:  # ε- or v-MSE, by the teacher's prediction_type
            loss_fake = denoising_loss(raw, nets.mu_fake.target(x, b.eps_fake, b.t_fake))
    check_finite(loss_fake=loss_fake)
    with record_function("µfake backward + AdamW"):
        accelerator.backward(loss_fake)
        grad = accelerator.clip_grad_norm_(nets.mu_fake_ddp.parameters(), args.grad_clip)
        opt_fake.step()
        opt_fake.zero_grad(set_to_none=True)
    return dict(loss_fake=loss_fake.item(), grad_fake=grad.item())


def dmd_step(step, nets, opt_g, opt_fake, b, args, accelerator):
    """One step of the algorithm box. netG is updated on steps 0, k, 2k, ... (k = --gen-every); otherwise G's images
    for µfake are made without grad. Returns (generator numbers or {}, µfake numbers)."""
    if step % args.gen_every == 0:
        x, g_stats = generator_update(nets, opt_g, b, args, accelerator)
    else:
        with record_function("netG forward"), torch.no_grad(), accelerator.autocast():
            x, g_stats = generator(nets, b.z, b.y), {}
    return g_stats, fake_score_update(nets, opt_fake, x, b, args, accelerator)


def check_finite(**losses):
    """A non-finite loss stops training before it reaches the weights (the caller names the step and checkpoint)."""
    for name, value in losses.items():
        if not torch.isfinite(value):
            raise FloatingPointError(f"{name} is {value.item()}")
