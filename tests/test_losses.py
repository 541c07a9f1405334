import torch
import torch.nn.functional as F

from losses import dm_loss, dm_timesteps, gan_discriminator_loss, gan_generator_loss, pseudo_huber, regression_loss


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
