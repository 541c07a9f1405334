"""One DMD step, as named functions to hold against the algorithm box (docs/ALGORITHM.md):

    batch = draw_batch(...)                  # fresh z, y, t, ε (+ pairs, real images, generator steps)
    dmd_step(...):
        generator_update(...)                # every --gen-every steps: loss_G = loss_DM + λ_reg loss_reg + λ_GAN loss_GAN
        fake_score_update(...)               # every step: µfake's denoising loss (+ the GAN head's loss) on G's images

DMD (Yin et al. 2023) is the default; DMD2 (Yin et al. 2024) is the same step with --reg-weight 0 (no pairs),
--gen-every 5, a GAN head on µfake (--gan-weight, --gan-disc-weight) and optionally a K-step generator
(--generator-steps K, --backward-simulation). SiD (Zhou et al. 2024) is the same step with another generator loss
(--generator-loss sid), and SiDA that with the GAN head. distill.py runs these functions in its loop; benchmarks/
time the very same ones. The method's knobs are declared here, once (`StepConfig` and its flags in
`add_arguments`), beside the code that reads them.
"""
import contextlib
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.profiler import record_function

from cli import number
from losses import (F_DIVERGENCES, denoising_loss, dm_loss, dm_timesteps, f_divergence_weight, gan_discriminator_loss,
                    gan_generator_loss, sid_loss)
from models import Denoiser
from sampling import generator_timesteps


@dataclass(frozen=True)
class StepConfig:
    """Everything one DMD step reads, typed and in one place (built from distill.py's flags by `from_args`; tests and
    benchmarks build it directly). The defaults are the flags' defaults: DMD with the seed's regression weight."""
    batch_size: int = 64  # the GLOBAL batch; each process keeps its slice
    seed: int = 0  # pairs' and real images' per-epoch permutations
    guidance: float = 1.0  # µreal's classifier-free guidance scale (1 = none)
    gen_every: int = 1
    dm_weight: float = 1.0
    reg_weight: float = 0.25
    t_min: float = 0.02
    t_max: float = 0.98
    dm_shift: float = 1.0  # the DM loss's t moved toward noise, as a flow model's timestep shift (1 = DMD2's uniform)
    guidance_t_max: float = 1.0  # µreal guided only at t <= this x T; unguided above (1 = everywhere, DMD2)
    fake_loss: str = "native"
    gan_weight: float = 0.0
    gan_disc_weight: float = 1e-2
    gan_t_max: float = 1.0
    gan_features: str = "fake"  # the head reads µfake's features (DMD2) or the frozen teacher's (FastGen)
    generator_steps: int = 1
    backward_simulation: bool = False
    reg_step_inputs: str = "noised"  # K-step regression: step k > 0's input, x_ref noised to t_k or the teacher's state
    grad_clip: float = 1.0
    divergence: str = "reverse-kl"
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    ratio_bins: int = 10
    generator_loss: str = "dmd"
    sid_alpha: float = 1.2

    @classmethod
    def from_args(cls, args, **overrides):
        """The step's fields picked from parsed flags (and `overrides`, e.g. a guidance resolved from the teacher)."""
        return cls(**{f.name: overrides[f.name] if f.name in overrides else getattr(args, f.name) for f in fields(cls)})


def add_arguments(p):
    """The DMD step's flags (distill.py adds the loop's: lr, steps, logging; --batch-size and --seed are its too).
    Defaults are StepConfig's."""
    C = StepConfig
    p.add_argument("--gen-every", type=number(int, 0), default=C.gen_every, help="netG update every N steps (1 = DMD, 5 = DMD2's two time-scale rule)")
    p.add_argument("--guidance", type=lambda s: s if s == "best" else number(float, 0, inclusive=True)(s), default=None,
                   help="µreal's guidance scale, or `best`: the guidance of the teacher's best row over steps x guidance "
                        "in <run-dir>/eval/report.json (evaluate.py's); default the pairs' (they must match), else "
                        "recipes.default_guidance")
    p.add_argument("--dm-weight", type=number(float, 0, inclusive=True), default=C.dm_weight, help="weight of the DM loss, or of SiD's with --generator-loss sid; 0 with --gan-weight 0: the regression loss alone, netG every step, µfake never (the recipe's warm start)")
    p.add_argument("--reg-weight", type=number(float, 0, inclusive=True), default=C.reg_weight, help="λ_reg on the regression loss (seed's α: 0.25); 0 = DMD2: no pairs needed")
    p.add_argument("--reg-loss", default="lpips", choices=["lpips", "pseudo_huber", "l2"], help="regression distance (LPIPS at 224 as DMD)")
    p.add_argument("--huber-c", type=number(float, 0), default=0.03, help="pseudo-Huber c (on the per-pixel RMS scale)")
    p.add_argument("--t-min", type=number(float, 0, inclusive=True), default=C.t_min, help="DM loss t range, as a fraction of T (DMD2: 0.02)")
    p.add_argument("--t-max", type=number(float, 0), default=C.t_max, help="DM loss t range upper end (DMD2: 0.98)")
    p.add_argument("--dm-shift", type=number(float, 0), default=C.dm_shift,
                   help="move the DM loss's t toward noise: s = (t+1)/T -> shift s / (1 + (shift-1) s), a flow model's "
                        "timestep shift (DMD2's users on SD3: it helped); 1 = uniform, as DMD2")
    p.add_argument("--guidance-t-max", type=number(float, 0), default=C.guidance_t_max, help="µreal's guidance only at t <= this x T, the conditional teacher unguided above it (1 = at every t, DMD2); guidance at the noisiest inputs costs diversity (Kynkäänniemi et al. 2024, guidance in a limited interval)")
    p.add_argument("--fake-loss", default=C.fake_loss, choices=["native", "x0"], help="µfake objective: the teacher's own (ε or v) or the seed's x̂0 form")
    p.add_argument("--gan-weight", type=number(float, 0, inclusive=True), default=C.gan_weight, help="λ_GAN of the generator's GAN loss through µfake's head (DMD2: 3e-3 on ImageNet-64; 0 = no GAN)")
    p.add_argument("--gan-disc-weight", type=number(float, 0, inclusive=True), default=C.gan_disc_weight, help="weight of the head's loss in µfake's update (DMD2: 1e-2)")
    p.add_argument("--gan-head-input", default="bottleneck", choices=["bottleneck", "down", "up", "levels"],
                   help="ContextUnet teachers: the GAN head reads the bottleneck after t and y entered it (DMD2's "
                        "placement; pooled, no spatial layout), the down path's 7x7 map, blind to t and y (measured "
                        "better on the CPU demo: docs/RESULTS.md), the first up block's 14x14 map (t, y and "
                        "layout; measured no better), or each of the down path's maps, 28x28 to 7x7, with a head "
                        "each (texture at full resolution; measured no better); a UNet2DModel's head reads its mid "
                        "block, a DiT's its middle block's tokens, whatever this says")
    p.add_argument("--gan-features", default=C.gan_features, choices=["fake", "teacher"],
                   help="whose features of the noised image the GAN head reads (--gan-head-input picks which): µfake's "
                        "(DMD2: one network, whose score learning the head's loss also shapes) or the frozen teacher's "
                        "(FastGen: features that know real images and that the head's loss cannot move)")
    p.add_argument("--gan-t-max", type=number(float, 0, inclusive=True), default=C.gan_t_max, help="GAN inputs (real and G's) noised at t ~ U[0, this x T) (DMD2's diffusion GAN: 1); 0 = t = 0 only, the least noise the schedule has")
    p.add_argument("--generator-steps", type=number(int, 0), default=C.generator_steps, help="K: the generator's steps, at K timesteps evenly spaced from T-1 (DMD2: 4)")
    p.add_argument("--backward-simulation", action="store_true", help="K > 1: make step k's training input by running the current G from noise through steps 0..k-1 (DMD2), not by noising a real image")
    p.add_argument("--reg-step-inputs", default=C.reg_step_inputs, choices=["noised", "teacher"],
                   help="K-step regression (the warm start): step k > 0 learns to map x_ref noised to t_k with fresh "
                        "noise (noised: the teacher's own denoising objective, whose answer at high t is a blur of the "
                        "images it could be), or the teacher's DDIM state at t_k on the way to x_ref (teacher: a "
                        "function, as step 0's z -> x_ref is; pairs from precompute.py --generator-steps K; the "
                        "regression alone only: --dm-weight 0 --gan-weight 0)")
    p.add_argument("--grad-clip", type=number(float, 0), default=C.grad_clip, help="max gradient norm, both networks")
    p.add_argument("--divergence", default=C.divergence, choices=list(F_DIVERGENCES),
                   help="the f-divergence the DM gradient minimises (f-distill): reverse-kl = DMD (mode-seeking); js, "
                        "forward-kl, ... weight each sample by h(r), r = p_real/p_fake from the GAN head (needs --gan-weight > 0)")
    p.add_argument("--ratio-min", type=number(float, 0), default=C.ratio_min, help="f-divergence: r clipped below at this (f-distill: 0.1)")
    p.add_argument("--ratio-max", type=number(float, 0), default=C.ratio_max, help="f-divergence: r clipped above at this (f-distill: 20)")
    p.add_argument("--ratio-bins", type=number(int, 0, inclusive=True), default=C.ratio_bins,
                   help="f-divergence: r divided by its batch mean within this many t-bins, so h does not just follow t (f-distill: 10; 0 = off)")
    p.add_argument("--generator-loss", default=C.generator_loss, choices=["dmd", "sid"],
                   help="netG's distribution-matching loss: DMD's score difference, or SiD's score-identity loss "
                        "(Zhou et al. 2024), whose gradient also flows through µreal's and µfake's inputs; with "
                        "--gan-weight > 0, SiDA")
    p.add_argument("--sid-alpha", type=number(float, 0, inclusive=True), default=C.sid_alpha,
                   help="SiD's α, the weight of its -||f_φ - f_ψ||² term (SiD: 1.2; SiDA: 1.0; lower it where 1.2 "
                        "diverges)")
    return p


def needs_real_images(cfg):
    """Real training images are needed by the GAN head, and by a K-step generator trained without backward simulation
    (not by the regression alone: its later steps denoise the pairs' images)."""
    return cfg.gan_weight > 0 or (cfg.generator_steps > 1 and not cfg.backward_simulation and not regression_only(cfg))


@dataclass
class Networks:
    net_g: Denoiser  # the generator G: a copy of the teacher, read at its K timesteps (trained)
    mu_real: Denoiser  # the frozen teacher: the real score
    mu_fake: Denoiser  # the fake score, trained online on G's images (with the GAN head when --gan-weight > 0)
    regression: Optional[Callable]  # the regression distance d(G(z_ref), x_ref): LPIPS, pseudo-Huber or L2; None = DMD2
    net_g_ddp: Optional[nn.Module] = None  # net_g / mu_fake as accelerator.prepare wrapped them (gradients synced
    mu_fake_ddp: Optional[nn.Module] = None  # across processes); default the modules themselves

    def __post_init__(self):
        self.net_g_ddp = self.net_g_ddp or self.net_g
        self.mu_fake_ddp = self.mu_fake_ddp or self.mu_fake


@dataclass
class Batch:
    """One step's random draws: this process's slice of the global batch (shapes B = per-process batch)."""
    z: torch.Tensor  # (B, C, H, W) noise, G's input at its first step
    y: Optional[torch.Tensor]  # (B,) labels for G, µreal and µfake; None for unconditional teachers
    t_dm: torch.Tensor  # (B,) the DM loss's timesteps
    eps_dm: torch.Tensor  # (B, C, H, W) the DM loss's noise
    t_fake: torch.Tensor  # (B,) µfake's training timesteps
    eps_fake: torch.Tensor  # (B, C, H, W) µfake's training noise
    z_ref: Optional[torch.Tensor] = None  # (B, C, H, W) a batch of precomputed pairs: noise,
    y_ref: Optional[torch.Tensor] = None  # label
    x_ref: Optional[torch.Tensor] = None  # and the teacher's image
    s_ref: Optional[torch.Tensor] = None  # (B, K-1, C, H, W) the teacher's DDIM states at t_1..t_{K-1} toward x_ref
    k: Optional[torch.Tensor] = None  # (B,) K-step generator: each sample's step index
    eps_steps: Optional[torch.Tensor] = None  # (K-1, B, C, H, W) re-noising to steps 1..K-1 (backward simulation)
    x_real: Optional[torch.Tensor] = None  # (B, C, H, W) real training images (GAN head; K-step inputs without
    y_real: Optional[torch.Tensor] = None  # (B,) their labels                   backward simulation)
    t_gan: Optional[torch.Tensor] = None  # (B,) the GAN inputs' noise levels
    eps_gan: Optional[torch.Tensor] = None  # (2, B, C, H, W) their noise: [0] for G's images, [1] for the real ones


def draw_batch(gen, step, cfg, shape, num_classes, T, pairs=None, real=None, rank=0, world=1, device="cpu"):
    """Every process draws the same GLOBAL batch from one generator `gen` and keeps the slice [rank::world], so N
    processes with batch B/N train exactly as one process with batch B, and resuming needs one generator state.
    Pairs and real images are visited in per-epoch permutations that are functions of (seed, epoch): resumable with
    no state. `pairs` = (noise, image, labels or None, states or None) or None; `real` = a dataset of (image, label)
    or None."""
    Bg, mine = cfg.batch_size, slice(rank, None, world)

    def draw(x):
        return x[mine].to(device)

    def visit(n, salt):  # this step's indices into n items, in a per-epoch permutation
        epoch, offset = divmod(step, n // Bg)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + salt + epoch))
        return perm[offset * Bg:(offset + 1) * Bg][mine]
    b = Batch(z=draw(torch.randn((Bg, *shape), generator=gen)),
              y=draw(torch.randint(0, num_classes, (Bg,), generator=gen)) if num_classes else None,
              t_dm=draw(dm_timesteps(Bg, T, gen, cfg.t_min, cfg.t_max, cfg.dm_shift)),
              eps_dm=draw(torch.randn((Bg, *shape), generator=gen)),
              t_fake=draw(torch.randint(0, T, (Bg,), generator=gen)),
              eps_fake=draw(torch.randn((Bg, *shape), generator=gen)))
    K = cfg.generator_steps
    if K > 1:  # (draws only the options use: DMD's stream stays what it was)
        b.k = draw(torch.randint(0, K, (Bg,), generator=gen))
        b.eps_steps = draw(torch.randn((K - 1, Bg, *shape), generator=gen).transpose(0, 1)).transpose(0, 1)
    if cfg.gan_weight > 0:
        b.t_gan = draw(torch.randint(0, max(1, round(cfg.gan_t_max * T)), (Bg,), generator=gen))
        b.eps_gan = draw(torch.randn((Bg, 2, *shape), generator=gen)).transpose(0, 1)
    if pairs is not None:
        z_pairs, x_pairs, y_pairs, s_pairs = pairs
        idx = visit(len(z_pairs), 0)
        b.z_ref, b.x_ref = z_pairs[idx].to(device), x_pairs[idx].to(device)
        b.y_ref = y_pairs[idx].to(device) if y_pairs is not None else None
        b.s_ref = s_pairs[idx].to(device) if s_pairs is not None else None
    if real is not None:
        items = [real[int(i)] for i in visit(len(real), 10 ** 6)]
        b.x_real = torch.stack([x for x, _ in items]).to(device)
        b.y_real = torch.as_tensor([y for _, y in items]).to(device) if num_classes else None
        if K > 1 and not cfg.backward_simulation and num_classes:
            b.y = b.y_real  # G denoises noised real images (k > 0) as their own class; at k = 0 any label will do
    return b


def generator(nets, x_t, t, y):
    """G(x_t, t, y): one network evaluation, x̂0 of netG (through the DDP wrapper, so that its gradients are synced
    across processes). The one-step generator is G(z, T-1, y)."""
    return nets.net_g.to_x0(x_t, t, nets.net_g_ddp(x_t, t, y, for_x0=True))


@torch.no_grad()
def generator_inputs(nets, b, cfg):
    """(x_{t_k}, t_k) for each sample's generator step k: pure noise z at k = 0; at k > 0, with backward simulation
    the current G run from z through steps 0..k-1, each x̂0 re-noised to the next timestep with fresh noise (as
    sampling does, so training inputs match inference); without it, a real image noised to t_k."""
    ts = torch.as_tensor(generator_timesteps(nets.net_g.T, cfg.generator_steps), device=b.z.device)
    if cfg.generator_steps == 1:
        return b.z, ts[0].expand(len(b.z))
    if not cfg.backward_simulation:
        return noised_step_inputs(nets, b.z, b.x_real, b.z, b.k, ts)
    t = ts[b.k]
    x_t, x = b.z.clone(), b.z
    for j in range(int(b.k.max())):  # step j's output, re-noised to t_{j+1}, is the input of samples with k = j+1
        x = nets.net_g.add_noise(generator(nets, x, ts[j].expand(len(x)), b.y), b.eps_steps[j], ts[j + 1].expand(len(x)))
        x_t = torch.where((b.k == j + 1).view(-1, 1, 1, 1), x, x_t)
    return x_t, t


def noised_step_inputs(nets, z, x0, noise, k, ts):
    """(x_{t_k}, t_k) without simulating G: z at step k = 0, x0 noised to t_k = ts[k] with `noise` at k > 0."""
    t = ts[k]
    return torch.where((k == 0).view(-1, 1, 1, 1), z, nets.net_g.add_noise(x0, noise, t)), t


@contextlib.contextmanager
def frozen(module):
    """Parameters that get no gradient inside the block: G's GAN loss flows through µfake to G's images (and SiD's
    loss through µreal and µfake) without computing (and leaving behind) gradients for their own weights."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def gan_inputs(nets, x, eps, b):
    """Images noised for the GAN head: x_t at the step's t_gan (DMD2's diffusion GAN)."""
    return nets.mu_fake.add_noise(x, eps, b.t_gan)


def realism(nets, mu_fake, x_t, t, y, cfg):
    """The GAN head's logit for x_t (the head lives in µfake, `mu_fake` it or its data-parallel wrapper): on µfake's
    features, or with --gan-features teacher on µreal's (frozen: only the head learns from the head's loss; netG's
    gradient still flows through them to x_t)."""
    features = nets.mu_real.bottleneck(x_t, t, y) if cfg.gan_features == "teacher" else None
    return mu_fake(x_t, t, y, realism=True, features=features)


def generator_update(nets, opt_g, b, cfg, accelerator):
    """One netG update: loss_G = loss_DM + λ_reg loss_reg + λ_GAN loss_GAN (docs/ALGORITHM.md, "Generator update");
    --generator-loss sid puts SiD's loss in loss_DM's place, and SiDA (with the GAN) halves it and the GAN term.
    Returns G's images of the fresh batch (detached, for µfake's update) and the numbers to log."""
    B = len(b.z)
    x_in, t_in = generator_inputs(nets, b, cfg)
    with accelerator.autocast():
        with record_function("netG forward"):
            with_pairs = b.z_ref is not None
            x_in = torch.cat([x_in, b.z_ref]) if with_pairs else x_in  # fresh and regression batch in one forward
            t_in = torch.cat([t_in, t_in.new_full((B,), nets.net_g.T - 1)]) if with_pairs else t_in
            y = torch.cat([b.y, b.y_ref]) if with_pairs and b.y is not None else b.y
            x_all = generator(nets, x_in, t_in, y)
            x, x_reg = x_all[:B], x_all[B:]
        sid = cfg.generator_loss == "sid"
        if sid:  # x_t keeps x's gradient, and both networks pass it on to x; their weights get none
            with record_function("µreal and µfake score G's images, gradient through x_t (SiD)"), \
                    frozen(nets.mu_real), frozen(nets.mu_fake):
                x_t = nets.net_g.add_noise(x, b.eps_dm, b.t_dm)
                f_phi = nets.mu_real.x0(x_t, b.t_dm, b.y, real_guidance(nets, b, cfg))  # guided, as DMD's real score
                f_psi = nets.mu_fake.x0(x_t, b.t_dm, b.y)  # never guided
            f_stats = {}  # f-distill weighs DMD's gradient only (distill.py refuses --divergence with SiD)
            loss_dm, w = sid_loss(x.float(), f_phi.float(), f_psi.float(), cfg.sid_alpha)
        else:
            with record_function("µreal and µfake score G's images"), torch.no_grad():
                x_t = nets.net_g.add_noise(x.detach(), b.eps_dm, b.t_dm)
                p_real = nets.mu_real.x0(x_t, b.t_dm, b.y, real_guidance(nets, b, cfg))  # guided: the real score
                p_fake = nets.mu_fake.x0(x_t, b.t_dm, b.y)  # never guided
            h, f_stats = (None, {}) if cfg.divergence == "reverse-kl" else f_weights(nets, x_t, b, cfg, accelerator)
            loss_dm, w = dm_loss(x.float(), p_real.float(), p_fake.float(), h)
        loss_reg = nets.regression(x_reg.float(), b.x_ref.float()) if with_pairs else torch.zeros(())
        loss_gan = torch.zeros(())
        if cfg.gan_weight > 0:
            with record_function("µfake's head on G's images"), frozen(nets.mu_fake):
                loss_gan = gan_generator_loss(realism(nets, nets.mu_fake, gan_inputs(nets, x, b.eps_gan[0], b),
                                                      b.t_gan, b.y, cfg).float())
        mix = 0.5 if sid and cfg.gan_weight > 0 else 1.0  # SiDA: 0.5 L_SiD + 0.5 λ_GAN L_GAN
        loss_g = mix * cfg.dm_weight * loss_dm + cfg.reg_weight * loss_reg + mix * cfg.gan_weight * loss_gan
    dm_key = "loss_sid" if sid else "loss_dm"  # SiD's loss is another quantity (it can be negative): another name
    check_finite(loss_g=loss_g, **{dm_key: loss_dm}, loss_reg=loss_reg, loss_gan=loss_gan)
    with record_function("netG backward + AdamW"):
        accelerator.backward(loss_g)
        grad = accelerator.clip_grad_norm_(nets.net_g.trained_parameters(), cfg.grad_clip)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    stats = {dm_key: loss_dm.item(), "loss_reg": loss_reg.item(), "loss_g": loss_g.item(), "w": w.mean().item(),
             "grad_g": grad.item(), **f_stats}
    if cfg.gan_weight > 0:
        stats["loss_gan"] = loss_gan.item()
    return x.detach(), stats


def real_guidance(nets, b, cfg):
    """µreal's guidance scale for each sample of the DM loss: cfg.guidance where t_dm <= guidance_t_max x T, none
    (1) above it, where the noisy input says little beyond its class and guidance pulls every sample toward the
    class's mode."""
    if cfg.guidance_t_max >= 1 or cfg.guidance == 1:  # a number: guided() then skips the unguided pass where s = 1
        return cfg.guidance
    return torch.where(b.t_dm <= cfg.guidance_t_max * nets.mu_real.T, cfg.guidance, 1.0)


@torch.no_grad()
def f_weights(nets, x_t, b, cfg, accelerator):
    """f-divergence weights h of the DM loss's samples, from µfake's GAN head on the very x_t and t the DM loss uses
    (one more head evaluation). The ratio's normalisation runs over the GLOBAL batch (gathered from every process),
    so N processes weigh as one. Returns (h of this process's samples, the numbers to log)."""
    with record_function("µfake's head on the DM loss's x_t (f-divergence)"):
        logit = realism(nets, nets.mu_fake, x_t, b.t_dm, b.y, cfg).float()
    h, r = f_divergence_weight(cfg.divergence, accelerator.gather(logit), accelerator.gather(b.t_dm), nets.mu_fake.T,
                               cfg.ratio_min, cfg.ratio_max, cfg.ratio_bins)
    stats = dict(r_mean=r.mean().item(), r_min=r.min().item(), r_max=r.max().item(),
                 h_mean=h.mean().item(), h_min=h.min().item(), h_max=h.max().item())
    return h.chunk(accelerator.num_processes)[accelerator.process_index], stats


def fake_score_update(nets, opt_fake, x, b, cfg, accelerator):
    """One µfake update: the teacher's own denoising objective on G's detached images, never guided
    (docs/ALGORITHM.md, "Fake score update"); with the GAN on, plus the head's loss on real vs G's images."""
    with record_function("µfake forward with grad"), accelerator.autocast():
        x_t = nets.mu_fake.add_noise(x, b.eps_fake, b.t_fake)
        raw = nets.mu_fake_ddp(x_t, b.t_fake, b.y)
        if cfg.fake_loss == "x0":  # the seed's form: ||µfake_x̂0(x_t, t) - x||²
            loss_fake = denoising_loss(nets.mu_fake.to_x0(x_t, b.t_fake, raw), x)
        else:  # ε- or v-MSE, by the teacher's prediction_type
            loss_fake = denoising_loss(raw, nets.mu_fake.target(x, b.eps_fake, b.t_fake))
        loss = loss_fake
        if cfg.gan_weight > 0:
            with record_function("µfake's head on real and G's images"):
                inputs = torch.cat([gan_inputs(nets, x, b.eps_gan[0], b), gan_inputs(nets, b.x_real, b.eps_gan[1], b)])
                labels = torch.cat([b.y, b.y_real]) if b.y is not None else None
                logit_fake, logit_real = realism(nets, nets.mu_fake_ddp, inputs, b.t_gan.repeat(2), labels,
                                                 cfg).float().chunk(2)
                loss_disc = gan_discriminator_loss(logit_fake, logit_real)
            loss = loss + cfg.gan_disc_weight * loss_disc
    check_finite(loss_fake=loss_fake, **({"loss_disc": loss_disc} if cfg.gan_weight > 0 else {}))
    with record_function("µfake backward + AdamW"):
        accelerator.backward(loss)
        grad = accelerator.clip_grad_norm_(nets.mu_fake.trained_parameters(), cfg.grad_clip)
        opt_fake.step()
        opt_fake.zero_grad(set_to_none=True)
    stats = dict(loss_fake=loss_fake.item(), grad_fake=grad.item())
    if cfg.gan_weight > 0:  # D(real) and D(G) as probabilities: both near 0.5 = the head cannot tell
        stats.update(loss_disc=loss_disc.item(), d_real=torch.sigmoid(logit_real).mean().item(),
                     d_fake=torch.sigmoid(logit_fake).mean().item())
    return stats


def regression_only(cfg):
    """No DM and no GAN term: netG learns from the pairs alone (knowledge distillation of the teacher's sampler,
    Luhman & Luhman 2021), and nothing reads µfake."""
    return cfg.dm_weight == 0 and cfg.gan_weight == 0


def regression_update(nets, opt_g, b, cfg, accelerator):
    """One netG update on the regression loss alone: G(z_ref, y_ref) toward the teacher's x_ref, every step (no µfake
    to keep up with). Cheaper than generator_update: neither the fresh batch nor µreal / µfake run. A K-step
    generator learns each of its steps: z_ref -> x_ref at k = 0, and at k > 0 either x_ref noised to t_k -> x_ref
    (the teacher's own denoising objective on its samples) or, with --reg-step-inputs teacher, the teacher's DDIM
    state at t_k -> x_ref (the rest of the teacher's ODE, one-to-one like step 0's map)."""
    ts = torch.as_tensor(generator_timesteps(nets.net_g.T, cfg.generator_steps), device=b.z_ref.device)
    x_in, t = b.z_ref, ts[0].expand(len(b.z_ref))
    if cfg.generator_steps > 1 and cfg.reg_step_inputs == "teacher":
        state = b.s_ref[torch.arange(len(b.k), device=b.k.device), (b.k - 1).clamp(min=0)]  # (rows with k = 0 take z_ref below)
        x_in, t = torch.where((b.k == 0).view(-1, 1, 1, 1), b.z_ref, state), ts[b.k]
    elif cfg.generator_steps > 1:
        x_in, t = noised_step_inputs(nets, b.z_ref, b.x_ref, b.z, b.k, ts)
    with record_function("netG forward"), accelerator.autocast():
        loss_reg = cfg.reg_weight * nets.regression(generator(nets, x_in, t, b.y_ref).float(), b.x_ref.float())
    check_finite(loss_reg=loss_reg)
    with record_function("netG backward + AdamW"):
        accelerator.backward(loss_reg)
        grad = accelerator.clip_grad_norm_(nets.net_g.trained_parameters(), cfg.grad_clip)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    return dict(loss_reg=loss_reg.item() / cfg.reg_weight, grad_g=grad.item())


def dmd_step(step, nets, opt_g, opt_fake, b, cfg, accelerator):
    """One step of the algorithm box. netG is updated on steps 0, k, 2k, ... (k = --gen-every); otherwise G's images
    for µfake are made without grad. Returns (generator numbers or {}, µfake numbers). Regression alone
    (regression_only): netG every step, µfake never."""
    if regression_only(cfg):
        return regression_update(nets, opt_g, b, cfg, accelerator), {}
    if step % cfg.gen_every == 0:
        x, g_stats = generator_update(nets, opt_g, b, cfg, accelerator)
    else:
        with record_function("netG forward"), torch.no_grad(), accelerator.autocast():
            x, g_stats = generator(nets, *generator_inputs(nets, b, cfg), b.y), {}
    return g_stats, fake_score_update(nets, opt_fake, x, b, cfg, accelerator)


def check_finite(**losses):
    """A non-finite loss stops training before it reaches the weights (the caller names the step and checkpoint)."""
    for name, value in losses.items():
        if not torch.isfinite(value):
            raise FloatingPointError(f"{name} is {value.item()}")
