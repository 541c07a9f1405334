import math

import pytest
import torch
import torch.nn.functional as F

from losses import (F_DIVERGENCES, dm_loss, dm_timesteps, f_divergence_weight, gan_discriminator_loss, gan_generator_loss,
                    pseudo_huber, regression_loss)


def test_dm_gradient_is_g_over_numel():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    p_real, p_fake = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    loss, w = dm_loss(x, p_real, p_fake)
    loss.backward()
    w_formula = (x.detach() - p_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    g = (p_fake - p_real) / w_formula
    torch.testing.assert_close(w, w_formula.flatten())
    torch.testing.assert_close(x.grad, g / x.numel())


def test_weighted_dm_gradient_is_h_times_g():
    """f-distill: each sample's DM gradient scaled by its weight h (and h = 1 is DMD's gradient exactly)."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    p_real, p_fake = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    h = torch.tensor([0.5, 1.0, 2.0, 0.0])
    dm_loss(x, p_real, p_fake, h)[0].backward()
    g = (p_fake - p_real) / (x.detach() - p_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x.grad, h.view(-1, 1, 1, 1) * g / x.numel())
    grad_h1 = x.grad.clone()
    x.grad = None
    dm_loss(x, p_real, p_fake, torch.ones(4))[0].backward()
    grad_ones = x.grad.clone()
    x.grad = None
    dm_loss(x, p_real, p_fake)[0].backward()
    assert torch.equal(grad_ones, x.grad) and not torch.equal(grad_h1, x.grad)


# h(r) = f''(r) r² for each f, written from the paper's table (Xu, Nie & Vahdat 2025, Table 1), up to a constant
PAPER_H = {"reverse-kl": lambda r: 1.0, "softened-rkl": lambda r: 1 / (1 + r), "js": lambda r: r / (1 + r),
           "hellinger": lambda r: r ** 0.5, "forward-kl": lambda r: r, "jeffreys": lambda r: 1 + r}


@pytest.mark.parametrize("divergence", sorted(PAPER_H))
def test_f_divergence_weight_is_the_papers_h_of_the_clipped_ratio(divergence):
    """r = exp(logit) clipped to [0.1, 20] (0.05 -> 0.1 and e^5 -> 20 at the bounds); h = h(r) / its batch mean."""
    assert set(F_DIVERGENCES) == set(PAPER_H)
    r_true = [0.05, 0.5, 1.0, 3.0, math.exp(5)]
    r_clipped = [0.1, 0.5, 1.0, 3.0, 20.0]
    logit = torch.tensor([math.log(r) for r in r_true])
    h, r = f_divergence_weight(divergence, logit, torch.zeros(5, dtype=torch.long), 1000, t_bins=0)
    torch.testing.assert_close(r, torch.tensor(r_clipped))
    raw = torch.tensor([float(PAPER_H[divergence](v)) for v in r_clipped])
    torch.testing.assert_close(h, raw / raw.mean())
    assert h.mean().item() == pytest.approx(1.0, abs=1e-6)
    if divergence in ("forward-kl", "js", "hellinger", "jeffreys"):  # mode-covering: more weight where r is larger
        assert (h.diff() > 0).all()


def test_f_divergence_ratio_is_normalised_within_t_bins():
    """With bins, r is divided by its mean within each t-bin: two bins whose ratios differ by 10x weigh alike."""
    logit = torch.tensor([1.0, 3.0, 10.0, 30.0]).log()
    t = torch.tensor([5, 80, 950, 999])  # bins of [0, 1000) in tenths: 0, 0, 9, 9
    h, r = f_divergence_weight("forward-kl", logit, t, 1000, r_max=100.0, t_bins=10)
    torch.testing.assert_close(r, torch.tensor([1.0, 3.0, 10.0, 30.0]))  # the logged r is the head's, un-binned
    torch.testing.assert_close(h, torch.tensor([0.5, 1.5, 0.5, 1.5]))  # r / bin mean (2 and 20); then batch mean 1


def test_gan_losses_push_the_logits_the_right_way():
    """DMD2's softplus forms, and their gradients' signs: descending the generator's loss raises D's logit on G's
    images; descending the head's loss raises D(real) and lowers D(fake)."""
    logit_fake = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    logit_real = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    loss_g = gan_generator_loss(logit_fake)
    torch.testing.assert_close(loss_g, F.softplus(-logit_fake).mean())
    loss_g.backward()
    assert (logit_fake.grad < 0).all()
    logit_fake.grad = None
    loss_d = gan_discriminator_loss(logit_fake, logit_real)
    torch.testing.assert_close(loss_d, (F.softplus(logit_fake) + F.softplus(-logit_real)).mean())
    loss_d.backward()
    assert (logit_fake.grad > 0).all() and (logit_real.grad < 0).all()


def test_equal_scores_give_zero_gradient():
    x = torch.randn(3, 3, 4, 4, requires_grad=True)
    p = torch.randn(3, 3, 4, 4)
    loss, _ = dm_loss(x, p, p.clone())
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0 and loss.item() == 0


def test_nan_and_inf_in_g_are_zeroed():
    x = torch.zeros(2, 1, 2, 2, requires_grad=True)
    p_real = torch.zeros(2, 1, 2, 2)  # w = 0 for both samples -> g = x/0
    p_fake = torch.tensor([[[[1.0, 0.0], [-1.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])  # inf, nan, -inf
    loss, _ = dm_loss(x, p_real, p_fake)
    loss.backward()
    assert torch.isfinite(loss) and torch.count_nonzero(x.grad) == 0


def test_timestep_range():
    g = torch.Generator().manual_seed(0)
    t = dm_timesteps(200_000, 1000, g)
    assert t.min().item() == 20 and t.max().item() == 980
    t = dm_timesteps(100_000, 400, g)
    assert t.min().item() == 8 and t.max().item() == 392


def test_timestep_shift_moves_the_draws_toward_noise():
    """--dm-shift 3 maps a draw's place u in the range [t_min T, t_max T] to 3u / (1 + 2u), from the same draws: the
    median goes from the range's middle to three quarters of it, the draws stay in the range; shift 1 is the draw
    itself."""
    plain = dm_timesteps(100_000, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(dm_timesteps(100_000, 1000, torch.Generator().manual_seed(0), shift=1.0), plain)
    shifted = dm_timesteps(100_000, 1000, torch.Generator().manual_seed(0), shift=3.0)
    u = (plain.double() - 20 + 0.5) / 961
    assert torch.equal(shifted, 20 + (3 * u / (1 + 2 * u) * 961).long())
    assert abs(shifted.double().median().item() - (20 + 0.75 * 961)) < 5 and shifted.min() >= 20 and shifted.max() == 980


def test_pseudo_huber():
    x, y = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    c = 0.03
    torch.testing.assert_close(pseudo_huber(x, y, c), torch.tensor((1 + c * c) ** 0.5 - c))
    assert pseudo_huber(x, x, c).item() == 0


def test_lpips_falls_back_loudly_without_weights(capsys, monkeypatch):
    import lpips

    def no_weights(*a, **k):
        raise OSError("trunk weights unavailable")
    monkeypatch.setattr(lpips, "LPIPS", no_weights)
    fn, used = regression_loss("lpips")
    assert used == "pseudo_huber" and "FALLS BACK" in capsys.readouterr().err
    assert fn(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)).item() == 0


def test_lpips_resizes_to_224_and_repeats_grey():
    from losses import LPIPS224
    lp = LPIPS224("alex", random_trunk=True)  # the real trunk needs a download; the wiring is what is tested
    seen = []
    lp.lpips.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    d = lp(x, x.flip(-1))
    assert seen[0] == (2, 3, 224, 224) and d.ndim == 0 and d.item() > 0
    assert lp(x, x).item() < 1e-6
