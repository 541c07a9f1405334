"""The DMD losses, one pure function per equation (docs/ALGORITHM.md gives each equation and names its function).

Shapes: B batch, C channels, H x W image. Images are in [-1, 1].
"""
import math
import sys

import torch
import torch.nn.functional as F


def dm_timesteps(B, T, generator=None, t_min=0.02, t_max=0.98, shift=1.0):
    """t ~ U{floor(t_min T) ... ceil(t_max T)} (inclusive), as DMD2 samples it; capped at T-1. shift > 1 moves the
    draws toward noise within that range, as a flow model's timestep shift does: u, the draw's place in the range, goes
    to shift u / (1 + (shift-1) u) (what DMD2's users found to help on SD3, its issue 62; Decoupled DMD shifts a flow
    teacher's DM timesteps too). shift 1: the draw itself."""
    lo, hi = math.floor(round(t_min * T, 6)), min(math.ceil(round(t_max * T, 6)), T - 1)
    t = torch.randint(lo, hi + 1, (B,), generator=generator)
    if shift == 1.0:
        return t
    u = (t.double() - lo + 0.5) / (hi - lo + 1)  # in (0, 1)
    return lo + (shift * u / (1 + (shift - 1) * u) * (hi - lo + 1)).long()


def dm_loss(x, p_real, p_fake, h=None):
    """Distribution matching loss.

    x:      (B, C, H, W) generator output G(z, y), with grad
    p_real: (B, C, H, W) µreal's x̂0 of the noised x (no grad, guided)
    p_fake: (B, C, H, W) µfake's x̂0 of the same noised x (no grad)
    h:      (B,) f-divergence weights (f_divergence_weight, no grad); None = reverse KL, DMD itself

    w = mean_{C,H,W} |x - p_real| per sample;  g = h (p_fake - p_real) / w, NaN/inf -> 0;
    loss = 0.5 MSE(x, stopgrad(x - g)), whose gradient w.r.t. x is g / numel(x): the score difference
    s_fake - s_real (up to weighting), i.e. ∇θ D_KL = E[-(s_real - s_fake) ∇θ G].
    Returns (loss, w (B,)) - w is logged: a collapsing w means x sits on µreal's prediction.
    """
    w = (x.detach() - p_real).abs().mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    g = torch.nan_to_num((p_fake - p_real) / w, nan=0.0, posinf=0.0, neginf=0.0)  # (B, C, H, W)
    if h is not None:
        g = h.view(-1, 1, 1, 1) * g
    return 0.5 * F.mse_loss(x, (x - g).detach()), w.flatten()


def sid_loss(x_g, f_phi, f_psi, alpha=1.2):
    """Score identity Distillation's generator loss (SiD, Zhou et al. 2024; docs/ALGORITHM.md, "SiD / SiDA").

    x_g:   (B, C, H, W) generator output G(z, y), with grad
    f_phi: (B, C, H, W) µreal's x̂0 of x_t = √ᾱ_t x_g + √(1-ᾱ_t) ε (guided), with grad through x_t (not its weights)
    f_psi: (B, C, H, W) µfake's x̂0 of the same x_t (never guided), likewise
    alpha: weight of the -||f_phi - f_psi||² term (SiD: 1.2, SiDA: 1.0)

    w = mean_{C,H,W} |x_g - f_phi| per sample, no grad (DMD's normaliser), at least 1e-5 as in SiD's code;
    loss = mean_{B,C,H,W} (f_phi - f_psi) · ((f_phi - x_g) - alpha (f_phi - f_psi)) / w.
    SiD's code sums over (C, H, W) where this takes the mean, so that with f_phi and f_psi detached the gradient
    w.r.t. x_g is (f_psi - f_phi) / (w numel) = dm_loss's g / numel exactly: same lr, same step as DMD's. With
    them attached, the gradient also flows through x_t into both networks (alpha only acts there).
    Returns (loss, w (B,)).
    """
    w = (x_g.detach() - f_phi.detach()).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)  # (B, 1, 1, 1)
    d = f_phi - f_psi  # (B, C, H, W) ∝ the score difference s_real - s_fake at x_t
    return (d * ((f_phi - x_g) - alpha * d) / w).mean(), w.flatten()


# f-distill (Xu, Nie & Vahdat 2025): minimising any f-divergence D_f(p_real || p_fake) = E_fake[f(r)] weights the DM
# gradient per sample by h(r) = f''(r) r², r = p_real(x_t) / p_fake(x_t) at the noised sample (constants dropped:
# h is normalised below). Reverse KL, f(r) = -log r, gives h = 1: DMD. Weights grow with r for the mode-covering ones:
# a sample where the real density exceeds the student's (a mode it under-covers) pulls harder.
F_DIVERGENCES = {
    "reverse-kl": lambda r: torch.ones_like(r),  # f = -log r (DMD, mode-seeking)
    "softened-rkl": lambda r: 1 / (1 + r),  # the paper's softened reverse KL
    "js": lambda r: r / (1 + r),  # f = r log r - (1 + r) log((1 + r) / 2)  (Jensen-Shannon)
    "hellinger": lambda r: r.sqrt(),  # f = (√r - 1)²  (squared Hellinger; h = √r / 2)
    "forward-kl": lambda r: r,  # f = r log r  (mode-covering)
    "jeffreys": lambda r: 1 + r,  # f = (r - 1) log r  (forward + reverse KL)
}


def f_divergence_weight(divergence, logit, t, T, r_min=0.1, r_max=20.0, t_bins=10):
    """The per-sample weight h of the DM gradient for an f-divergence, and the density ratio r behind it.

    logit: (B,) the GAN head's logit on the DM loss's noised sample x_t; the optimal head (real vs G's images,
           logistic loss) has logit = log p_real(x_t) / p_fake(x_t), so r = exp(logit)
    t:     (B,) that sample's timestep, of T

    r = exp(logit), the logit clamped to ±10 (exp cannot overflow), r clipped to [r_min, r_max] (a head's extreme
    logits are its least calibrated). With t_bins > 0, r is divided by its mean within t_bins equal bins of [0, T):
    the head separates lightly noised images far better than heavily noised ones, and without this the weights would
    mostly follow t. h = F_DIVERGENCES[divergence](r), divided by its batch mean, so the loss's scale (and the lr's
    meaning) stays DMD's. Returns (h (B,), r (B,) clipped, before the bins: the head's estimate, for the log).
    """
    r = logit.detach().float().clamp(-10, 10).exp().clamp(r_min, r_max)
    r_binned = r
    if t_bins:
        bin_of = (t * t_bins // T).clamp(max=t_bins - 1)
        count = torch.bincount(bin_of, minlength=t_bins)
        total = torch.bincount(bin_of, weights=r, minlength=t_bins)
        r_binned = r / (total / count.clamp(min=1))[bin_of]
    h = F_DIVERGENCES[divergence](r_binned)
    return h / h.mean(), r


def pseudo_huber(x, x_ref, c=0.03):
    """sqrt(||x - x_ref||^2 / d + c^2) - c per sample (d = C H W), averaged: L2-like far away, L1-like near."""
    d2 = (x - x_ref).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return ((d2 + c * c).sqrt() - c).mean()


def l2(x, x_ref):
    return F.mse_loss(x, x_ref)


class LPIPS224(torch.nn.Module):
    """LPIPS on images resized to 224x224 (as the DMD paper), grey images repeated to 3 channels."""

    def __init__(self, net="vgg", random_trunk=False):
        super().__init__()
        import lpips  # random_trunk: no ImageNet weights (tests only; the distance is then meaningless)
        self.lpips = lpips.LPIPS(net=net, pnet_rand=random_trunk, verbose=False).eval().requires_grad_(False)

    def forward(self, x, x_ref):  # (B, C, H, W) each -> scalar
        x, x_ref = (F.interpolate(a.repeat(1, 3 // a.shape[1], 1, 1), size=224, mode="bilinear", align_corners=False)
                    for a in (x, x_ref))
        return self.lpips(x, x_ref).mean()


def regression_loss(kind, c=0.03):
    """(loss function, the kind actually used). LPIPS needs trunk weights from the internet: where they cannot
    be loaded it falls back to pseudo-Huber with a loud notice (recorded in the run config by the caller)."""
    if kind == "lpips":
        try:
            return LPIPS224(), "lpips"
        except Exception as e:
            print(f"\n*** NOTICE: LPIPS trunk weights could not be loaded ({type(e).__name__}: {str(e)[:80]}); "
                  f"the regression loss FALLS BACK TO pseudo-Huber (c = {c}). ***\n", file=sys.stderr)
            kind = "pseudo_huber"
    if kind == "pseudo_huber":
        return (lambda x, x_ref: pseudo_huber(x, x_ref, c)), "pseudo_huber"
    return l2, "l2"


def denoising_loss(pred, target):
    """The denoising loss of µfake (and of the teacher's training): MSE between the backbone's prediction and its
    target, both (B, C, H, W). The target is the teacher's own: ε for ε-prediction, v for v-prediction, x0 for
    sample-prediction; the seed's x̂0 form passes µfake's x̂0 and G's image (same minimiser, another weighting over t)."""
    return F.mse_loss(pred.float(), target.float())


def gan_generator_loss(logit_fake):
    """DMD2's GAN loss for the generator (non-saturating): softplus(-D(G(z))) = -log sigmoid(D(G(z))), mean.
    logit_fake: (B,) the head's logits on G's images, with grad flowing back through µfake into G."""
    return F.softplus(-logit_fake).mean()


def gan_discriminator_loss(logit_fake, logit_real):
    """DMD2's loss for the GAN head (logistic): softplus(D(fake)) + softplus(-D(real)), mean over the batch.
    logit_fake: (B,) on G's detached images; logit_real: (B,) on real images. At chance it is 2 log 2 = 1.39."""
    return (F.softplus(logit_fake) + F.softplus(-logit_real)).mean()
