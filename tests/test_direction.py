"""Tests of direction: the method pushes the right way. Each test here fails when a sign or an argument order of the
method is flipped (µreal and µfake swapped in the DM loss, SiD's α negated or its gradient through the networks'
inputs cut, the GAN losses' logits negated or swapped), which tests of shapes, finiteness and resume cannot see. They
run the project's own code (dmd.py's updates, Denoiser, losses, metrics.class_accuracy, evaluate.add_gap_closed) on
tiny inputs whose right answer is known in closed form."""
import dataclasses
import types

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from conftest import TINY_N_FEAT, TINY_UNET
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import FrozenDict

import dmd
import evaluate
import metrics
from models import Denoiser, make_dmd_networks, make_teacher

T = 1000
SHAPE = (1, 4, 4)  # the Gaussian test's images: 16 i.i.d. pixels


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are tiny: a second thread only adds synchronisation (and on a busy 2-core machine, waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def step_config(**fields):
    """The DMD step's settings (the one place a test of this file builds them)."""
    return dmd.StepConfig(**fields)


def schedule(prediction_type):
    """The DDPM schedule of these tests; prediction_type "flow": flow matching on the same T (shift 1)."""
    if prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)
    return DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, prediction_type=prediction_type)


def path(kind, t):
    """(a_t, b_t) of x_t = a_t x0 + b_t ε in float64, (B, 1, 1, 1), written out here for both families: DDPM's
    (√ᾱ_t, √(1-ᾱ_t)) and flow matching's (1-σ_t, σ_t), σ_t = (t+1)/T at shift 1."""
    if kind == "flow":
        sigma = ((t.double() + 1) / T).view(-1, 1, 1, 1)
        return 1 - sigma, sigma
    a = schedule("epsilon").alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    return a.sqrt(), (1 - a).sqrt()


class GaussianDenoiser(nn.Module):
    """The exact denoiser of data x0 ~ N(m, s²) per pixel, as a diffusers-like backbone. On a Gaussian path
    x_t = a x0 + b ε, x_t is Gaussian too, so E[x0 | x_t] = m + a s² / (a² s² + b²) · (x_t - a m); the backbone
    returns what its schedule's network predicts: ε̂ = (x_t - a x̂0) / b (DDPM, called with t) or the velocity
    v̂ = (x_t - x̂0) / σ (flow, called with σ T). `stats()` gives (m, s) at call time: µfake reads the generator's
    current ones."""

    def __init__(self, stats, kind="ddpm"):
        super().__init__()
        self.stats, self.kind = stats, kind
        self.config = FrozenDict(sample_size=SHAPE[-1], in_channels=SHAPE[0])  # what Denoiser reads: no classes

    def forward(self, x_t, t, class_labels=None):
        m, s = self.stats()
        t = t.double().round().long() - 1 if self.kind == "flow" else t  # σ T = t + 1 at shift 1: the grid's t
        (a, b), x = path(self.kind, t), x_t.double()
        x0 = m + a * s ** 2 / (a ** 2 * s ** 2 + b ** 2) * (x - a * m)
        out = (x - x0) / b if self.kind == "flow" else (x - a * x0) / b
        return types.SimpleNamespace(sample=out.to(x_t.dtype))


class AffineGenerator(nn.Module):
    """G(z) = µ + σ z read at t = T-1 with x_t = z, so its images are N(µ, σ²): a sample-prediction backbone
    (DDPM), or a flow one whose velocity is z - (µ + σ z) (x̂0 = z - σ_{T-1} v̂ with σ_{T-1} = 1)."""

    def __init__(self, mu, sigma, kind="ddpm"):
        super().__init__()
        self.mu, self.sigma, self.kind = nn.Parameter(torch.tensor(mu)), nn.Parameter(torch.tensor(sigma)), kind
        self.config = FrozenDict(sample_size=SHAPE[-1], in_channels=SHAPE[0])

    def forward(self, z, t, class_labels=None):
        x = self.mu + self.sigma * z
        return types.SimpleNamespace(sample=z - x if self.kind == "flow" else x)


def gaussian_networks(g, m=0.3, s=0.5, kind="ddpm"):
    """netG = the affine generator `g`; µreal = the exact denoiser of the data N(m, s²); µfake = the exact denoiser of
    g's current N(µ, σ²); all three on the DDPM schedule or on flow matching's (`kind`)."""
    teacher = schedule("flow" if kind == "flow" else "epsilon")
    mu_real = Denoiser(GaussianDenoiser(lambda: (m, s), kind), teacher)
    mu_fake = Denoiser(GaussianDenoiser(lambda: (g.mu.item(), abs(g.sigma.item())), kind), teacher)
    return dmd.Networks(Denoiser(g, schedule("flow" if kind == "flow" else "sample")), mu_real, mu_fake, regression=None)


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
@pytest.mark.parametrize("generator_loss", ["dmd", "sid"])
@pytest.mark.parametrize("start", [(1.5, 1.5), (-1.0, 0.1)], ids=["from_above", "from_below"])
def test_dm_gradient_moves_the_generator_to_the_real_distribution(start, generator_loss, kind):
    """dmd.generator_update with the DM loss alone (DMD's, or SiD's), exact Gaussian denoisers as µreal (the data,
    N(0.3, 0.5²)) and µfake (the generator's current N(µ, σ²)), drives G(z) = µ + σz to the data's mean and std from
    above and from below, on the DDPM schedule and on flow matching's. With µreal and µfake swapped anywhere on the way
    (dmd.py's call, losses.dm_loss or losses.sid_loss), or a flow path's x_t or x̂0 written as DDPM's, it runs away
    or stops short instead."""
    m, s = 0.3, 0.5
    g = AffineGenerator(*start, kind)
    nets = gaussian_networks(g, m, s, kind)
    cfg = step_config(reg_weight=0, guidance=1.0, batch_size=64, grad_clip=1e9, generator_loss=generator_loss)
    opt, gen, accelerator = torch.optim.Adam(g.parameters(), 0.02), torch.Generator().manual_seed(0), Accelerator(cpu=True)
    for step in range(200):
        dmd.generator_update(nets, opt, dmd.draw_batch(gen, step, cfg, SHAPE, 0, T), cfg, accelerator)
    assert abs(g.mu.item() - m) < 0.03 and abs(abs(g.sigma.item()) - s) < 0.03, (g.mu.item(), g.sigma.item())


def gradient_on_images(nets, b, cfg):
    """The gradient that dmd.generator_update's loss sends to G's images x, caught on dmd.generator's output (netG
    takes an SGD step of lr 0: nothing moves)."""
    grads, make = [], dmd.generator

    def generator(*args):
        x = make(*args)
        x.register_hook(grads.append)
        return x
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dmd, "generator", generator)
        dmd.generator_update(nets, torch.optim.SGD(nets.net_g.parameters(), 0.0), b, cfg, Accelerator(cpu=True))
    return grads[0]


def tiny_networks():
    """A tiny class-conditional ContextUnet teacher (v-prediction) -> netG, µreal, µfake, and one batch of 4 drawn
    for them, µreal guided at s = 2. Random weights moved as training would: the teacher's, so that its label (and
    so guidance) matters, and µfake's off µreal's, so that the score difference stands well above float32's rounding."""
    torch.manual_seed(0)
    backbone, scheduler = make_teacher("mnist", "v_prediction", n_feat=TINY_N_FEAT)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.3 * torch.randn_like(p))
    nets = dmd.Networks(*make_dmd_networks(backbone.eval(), scheduler), regression=None)
    with torch.no_grad():
        for p in nets.mu_fake.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = step_config(reg_weight=0, guidance=2.0, batch_size=4)
    return nets, cfg, dmd.draw_batch(torch.Generator().manual_seed(0), 0, cfg, (1, 28, 28), 10, nets.net_g.T)


def test_sid_gradient_with_detached_scores_is_dmds():
    """With µreal's and µfake's outputs detached (no gradient through their inputs), SiD's gradient on G's images is
    DMD's, (p_fake - p_real) / (w numel), on the same draws, µreal guided alike: the same direction at the same scale,
    whatever α. With f_φ and f_ψ swapped in losses.sid_loss or dmd.py, SiD's sign flipped, or µreal left unguided,
    it is another."""
    nets, cfg, b = tiny_networks()
    for den in (nets.mu_real, nets.mu_fake):  # x̂0 detached: SiD's gradient without the networks' Jacobians
        den.x0 = lambda *args, x0=den.x0, **kw: x0(*args, **kw).detach()
    dm = gradient_on_images(nets, b, cfg)
    for alpha in (1.2, 0.0):
        sid = gradient_on_images(nets, b, dataclasses.replace(cfg, generator_loss="sid", sid_alpha=alpha))
        torch.testing.assert_close(sid, dm, rtol=1e-4, atol=1e-4 * dm.abs().max().item())


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_sid_gradient_flows_through_the_scores_inputs_as_the_formula_says(kind):
    """With exact Gaussian denoisers, x̂0 is affine in x_t per pixel, f(x_t) = m + k (x_t - a m) with
    k = a s² / (a² s² + b²) on the path x_t = a x_g + b ε (DDPM: a = √ᾱ, b = √(1-ᾱ); flow: a = 1-σ, b = σ), so the
    whole gradient of SiD's loss on x_g, through x_t into both networks too, is known in closed form
    (d = f_φ - f_ψ):
        ∂L/∂x_g = [-d + a ((k_φ - k_ψ) (f_φ - x_g - 2α d) + k_φ d)] / (w numel).
    The first term alone is DMD's; with α's sign flipped, or x_t detached (no gradient through the networks), the
    gradient dmd.generator_update sends to G's images is another."""
    (m, s), (mu, sigma), alpha = (0.3, 0.5), (1.5, 1.5), 1.2
    nets = gaussian_networks(AffineGenerator(mu, sigma, kind), m, s, kind)
    cfg = step_config(reg_weight=0, guidance=1.0, batch_size=16, generator_loss="sid", sid_alpha=alpha)
    b = dmd.draw_batch(torch.Generator().manual_seed(0), 0, cfg, SHAPE, 0, T)
    got = gradient_on_images(nets, b, cfg).double()
    a, noise = path(kind, b.t_dm)
    x_g = mu + sigma * b.z.double()
    x_t = a * x_g + noise * b.eps_dm.double()
    k_phi, k_psi = (a * v ** 2 / (a ** 2 * v ** 2 + noise ** 2) for v in (s, sigma))
    f_phi, f_psi = m + k_phi * (x_t - a * m), mu + k_psi * (x_t - a * mu)
    d, w = f_phi - f_psi, (x_g - f_phi).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (-d + a * ((k_phi - k_psi) * (f_phi - x_g - 2 * alpha * d) + k_phi * d)) / (w * x_g.numel())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
    through_networks = expected + d / (w * x_g.numel())
    assert through_networks.norm() > 0.3 * expected.norm()  # the networks' part is no rounding error


def test_sid_gradient_reaches_g_through_frozen_networks():
    """On real (tiny, class-conditional, guided) networks, SiD's gradient on G's images differs from DMD's - which is
    SiD's with the scores detached (above) - by the part that flows back through µreal's and µfake's inputs, and
    leaves no gradient on either network's weights (their requires_grad flags come back as they were)."""
    nets, cfg, b = tiny_networks()
    dm = gradient_on_images(nets, b, cfg)
    sid = gradient_on_images(nets, b, dataclasses.replace(cfg, generator_loss="sid"))
    assert (sid - dm).norm() > 0.1 * dm.norm(), ((sid - dm).norm(), dm.norm())
    assert all(p.grad is None for net in (nets.mu_real, nets.mu_fake) for p in net.parameters())
    assert not any(p.requires_grad for p in nets.mu_real.parameters())
    assert all(p.requires_grad for p in nets.mu_fake.parameters())


GAN_SHAPE = (1, 16, 16)


def gan_networks():
    """Tiny unconditional UNet2DModel teacher -> netG, µreal, µfake with DMD2's head. (Its mid-block features are O(1)
    at initialisation, so the head learns in a few steps; the tiny ContextUnet's bottleneck is ~0.02 and barely
    differs between inputs until trained.)"""
    torch.manual_seed(0)
    backbone, scheduler = make_teacher("custom", "v_prediction", unet=TINY_UNET, shape=GAN_SHAPE)
    return dmd.Networks(*make_dmd_networks(backbone.eval(), scheduler, gan_head=True), regression=None)


def square(n, gen):
    """The "real" images: a bright square on a dark background, easily told from uniform noise (the "fake" ones)."""
    x = -torch.ones(n, *GAN_SHAPE)
    x[..., 5:11, 5:11] = 1
    return x + 0.1 * torch.randn(x.shape, generator=gen)


def noise(n, gen):
    return torch.rand((n, *GAN_SHAPE), generator=gen) * 2 - 1


def test_gan_head_learns_to_tell_real_from_fake():
    """dmd.fake_score_update's head loss, on real squares against "generated" noise (t = 0: --gan-t-max 0), makes the
    head score new real images above new fake ones by a margin. With real and fake swapped in the head's loss it
    learns the opposite."""
    nets, gen = gan_networks(), torch.Generator().manual_seed(0)
    cfg = step_config(reg_weight=0, gan_weight=1.0, gan_disc_weight=1.0, gan_t_max=0, batch_size=8)
    real = torch.utils.data.TensorDataset(square(16, gen), torch.zeros(16))
    opt, accelerator = torch.optim.AdamW(nets.mu_fake.parameters(), 1e-2), Accelerator(cpu=True)
    for step in range(20):
        b = dmd.draw_batch(gen, step, cfg, GAN_SHAPE, 0, nets.mu_fake.T, None, real)
        dmd.fake_score_update(nets, opt, noise(8, gen), b, cfg, accelerator)
    t = torch.zeros(32, dtype=torch.long)
    with torch.no_grad():
        margin = nets.mu_fake(square(32, gen), t, realism=True).mean() - nets.mu_fake(noise(32, gen), t, realism=True).mean()
    assert margin > 0.25, margin.item()  # 0.45 as written; negative with real and fake swapped


def test_generator_gan_gradient_raises_the_heads_logit_on_its_images():
    """dmd.generator_update with the GAN loss alone moves G so that the head scores G's images (same z, same GAN
    noise) higher, every one of them: G climbs D. With the generator's loss on negated logits it descends."""
    nets = gan_networks()
    cfg = step_config(reg_weight=0, dm_weight=0, gan_weight=1.0, gan_t_max=0, batch_size=8)
    b = dmd.draw_batch(torch.Generator().manual_seed(0), 0, cfg, GAN_SHAPE, 0, nets.net_g.T)
    t_gen = torch.full((8,), nets.net_g.T - 1)

    @torch.no_grad()
    def logits():
        x = dmd.generator(nets, b.z, t_gen, None)
        return nets.mu_fake(dmd.gan_inputs(nets, x, b.eps_gan[0], b), b.t_gan, None, realism=True)
    before, opt = logits(), torch.optim.SGD(nets.net_g.parameters(), 1.0)
    for _ in range(3):
        dmd.generator_update(nets, opt, b, cfg, Accelerator(cpu=True))
    rise = logits() - before
    assert rise.min() > 0, rise  # +0.001 to +0.03 as written; negative with the logits negated


class BrightnessClassifier(nn.Module):
    """A stand-in for metrics.Classifier whose answer is known: class c is the image whose mean brightness is
    nearest CENTRES[c]. Returns (features, logits) like the real one."""
    CENTRES = torch.linspace(-0.9, 0.9, 10)

    def forward(self, x):
        logits = -(x.mean(dim=(1, 2, 3))[:, None] - self.CENTRES).abs()
        return logits, logits


def test_class_accuracy_gives_the_known_fractions():
    """metrics.class_accuracy on 40 images of known classes: all right, all wrong, and exactly a quarter right.
    (Pixels outside [-1, 1] are clipped first, as in a saved image: class 9's images at 3.0 still read as 0.9.)"""
    labels = torch.arange(40) % 10
    images = BrightnessClassifier.CENTRES[labels].view(-1, 1, 1, 1).expand(-1, 1, 8, 8).clone()
    images[labels == 9] = 3.0
    clf = BrightnessClassifier()
    assert metrics.class_accuracy(clf, images, labels) == 1.0
    assert metrics.class_accuracy(clf, images, (labels + 1) % 10) == 0.0
    quarter = torch.where(torch.arange(40) < 10, labels, (labels + 3) % 10)
    assert metrics.class_accuracy(clf, images, quarter) == 0.25


def test_gap_closed_is_the_formula_on_hand_made_rows():
    """gap_closed = (FID_teacher - FID) / (FID_teacher - FID_real), the teacher being its best DDIM row (lowest FID);
    a student worse than that teacher closes a negative share; no real row or no positive gap: no number."""
    def rows(*pairs):
        return dict(rows=[dict(model=name, fid=fid, nfe=nfe) for name, fid, nfe in pairs])
    report = rows(("real", 2.0, None), ("teacher-ddim-1", 50.0, 1), ("teacher-ddim-8", 10.0, 8),
                  ("teacher-ddim-25", 14.0, 25), ("onestep-before", 80.0, 1), ("student", 6.0, 1), ("student-ema", 12.0, 1))
    evaluate.add_gap_closed(report)
    by_name = {r["model"]: r for r in report["rows"]}
    assert report["gap_reference"] == "teacher-ddim-8"
    assert by_name["student"]["gap_closed"] == pytest.approx((10 - 6) / (10 - 2))  # 0.5
    assert by_name["student-ema"]["gap_closed"] == pytest.approx((10 - 12) / (10 - 2))  # -0.25
    assert "gap_closed" not in by_name["onestep-before"] and "gap_closed" not in by_name["teacher-ddim-1"]
    no_gap = rows(("real", 20.0, None), ("teacher-ddim-2", 10.0, 2), ("student", 6.0, 1))
    evaluate.add_gap_closed(no_gap)
    assert no_gap["rows"][-1]["gap_closed"] is None
    no_real = rows(("teacher-ddim-2", 10.0, 2), ("student", 6.0, 1))
    evaluate.add_gap_closed(no_real)
    assert no_real["gap_reference"] is None and "gap_closed" not in no_real["rows"][-1]


def test_gap_closed_is_against_the_best_guidance_not_the_students():
    """Hand-made rows of a guided teacher over steps x guidance: the student, distilled at guidance 3, is read against
    the teacher's best row at ANY guidance (guidance 2, DDIM-4: 20), not against its best row at guidance 3 (40); that
    second gap is reported too, as gap_closed_own."""
    rows = [dict(model=name, fid=fid, nfe=2 * int(name.split("-")[-1]), guidance=g) for name, fid, g in (
        ("teacher-g2-ddim-4", 20.0, 2.0), ("teacher-g2-ddim-8", 24.0, 2.0), ("teacher-g3-ddim-2", 44.0, 3.0),
        ("teacher-g3-ddim-4", 40.0, 3.0), ("teacher-g4-ddim-8", 60.0, 4.0))]
    report = dict(guidance=3.0, rows=[dict(model="real", fid=4.0, nfe=None), *rows, dict(model="student", fid=16.0, nfe=1)])
    evaluate.add_gap_closed(report)
    student = report["rows"][-1]
    assert report["gap_reference"] == "teacher-g2-ddim-4" and report["gap_reference_own"] == "teacher-g3-ddim-4"
    assert student["gap_closed"] == pytest.approx((20 - 16) / (20 - 4))  # 25%: beyond the teacher's best
    assert student["gap_closed_own"] == pytest.approx((40 - 16) / (40 - 4))  # 67%: the flattering reading


def test_high_frequency_share_on_known_spectra():
    """metrics.high_frequency_share: variations that are a checkerboard (0.5 cycles per pixel) are all high frequency,
    slow waves (1/28 cycles per pixel) none of it, an equal-power mix of the two half; the set's mean image (here a
    bright square every image shares) does not count."""
    i = torch.arange(28, dtype=torch.float64)
    checker, wave = (-1.0) ** (i[:, None] + i[None, :]), torch.cos(2 * torch.pi * i / 28)[:, None].expand(28, 28)
    signs = torch.tensor([1.0, -1.0] * 4).view(-1, 1, 1, 1)  # +/- the pattern: the set's mean is 0
    square = torch.zeros(28, 28)
    square[8:20, 8:20] = 1
    assert metrics.high_frequency_share(signs * checker + square) == pytest.approx(1.0)
    assert metrics.high_frequency_share(signs * wave + square) == pytest.approx(0.0, abs=1e-12)
    mix = torch.cat([signs * checker, signs * wave * 2 ** 0.5])  # the cosine's power is half its square's sum
    assert metrics.high_frequency_share(mix) == pytest.approx(0.5)
