"""The DMD step of dmd.py, in-process on tiny networks."""
import dataclasses
import math
import sys
from unittest import mock

import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_N_FEAT, run

import distill
import dmd
from cli import UserError
from losses import pseudo_huber
from models import Denoiser, make_dmd_networks, make_teacher
from sampling import generator_timesteps, one_step, sample_generator, seeded_noise


def setup(gen_every=1, seed=0):
    torch.manual_seed(seed)
    backbone, scheduler = make_teacher("mnist", "v_prediction", n_feat=TINY_N_FEAT)
    net_g, mu_real, mu_fake = make_dmd_networks(backbone.eval(), scheduler)
    nets = dmd.Networks(net_g, mu_real, mu_fake, pseudo_huber)
    args = dmd.StepConfig(gen_every=gen_every, guidance=2.0, batch_size=4, seed=0)
    opts = torch.optim.AdamW(net_g.parameters(), 1e-3), torch.optim.AdamW(mu_fake.parameters(), 1e-3)
    n = 8
    pairs = (torch.randn(n, 1, 28, 28), torch.rand(n, 1, 28, 28) * 2 - 1, torch.arange(n) % 10, None)
    return nets, opts, args, pairs


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("step, g_updated", [(0, True), (1, False)])
def test_one_step_updates_what_it_must(step, g_updated):
    nets, (opt_g, opt_fake), args, pairs = setup(gen_every=2)
    real, g, fake = weights(nets.mu_real), weights(nets.net_g), weights(nets.mu_fake)
    gen = torch.Generator().manual_seed(0)
    batch = dmd.draw_batch(gen, step, args, (1, 28, 28), 10, nets.net_g.T, pairs)
    g_stats, f_stats = dmd.dmd_step(step, nets, opt_g, opt_fake, batch, args, Accelerator(cpu=True))
    assert not changed(real, nets.mu_real)  # µreal is frozen
    assert changed(fake, nets.mu_fake) and len(opt_fake.state) > 0  # µfake stepped every step
    assert changed(g, nets.net_g) == g_updated and (len(opt_g.state) > 0) == g_updated  # netG on steps 0, 2, 4, ...
    assert all(math.isfinite(v) for v in {**g_stats, **f_stats}.values())
    assert set(f_stats) == {"loss_fake", "grad_fake"}
    assert set(g_stats) == ({"loss_dm", "loss_reg", "loss_g", "w", "grad_g"} if g_updated else set())


@pytest.mark.parametrize("dmd2", [False, True])
def test_batch_is_a_slice_of_the_global_batch(dmd2):
    """Two processes with batch B/2 draw exactly the halves of one process's batch B (N x B/N == 1 x B), for DMD's
    draws (pairs) and DMD2's (real images, generator steps, GAN noise)."""
    _, _, args, pairs = setup()
    real = None
    if dmd2:
        args = dmd.StepConfig(reg_weight=0, gan_weight=1e-3, generator_steps=3, backward_simulation=True, batch_size=4)
        pairs = None
        real = torch.utils.data.TensorDataset(torch.rand(12, 1, 28, 28), torch.arange(12) % 10)
    one = dmd.draw_batch(torch.Generator().manual_seed(3), 5, args, (1, 28, 28), 10, 400, pairs, real)
    names = [k for k, v in vars(one).items() if v is not None]
    assert len(names) == (12 if dmd2 else 9)
    for rank in (0, 1):
        part = dmd.draw_batch(torch.Generator().manual_seed(3), 5, args, (1, 28, 28), 10, 400, pairs, real, rank, 2)
        for name in names:
            whole = getattr(one, name)
            batch_dim = 1 if name in ("eps_steps", "eps_gan") else 0
            assert torch.equal(getattr(part, name), whole[rank::2] if batch_dim == 0 else whole[:, rank::2]), name


def test_non_finite_loss_stops_before_the_weights_change():
    nets, (opt_g, opt_fake), args, pairs = setup()
    batch = dmd.draw_batch(torch.Generator().manual_seed(0), 0, args, (1, 28, 28), 10, nets.net_g.T, pairs)
    batch.x_ref[0, 0, 0, 0] = float("nan")  # the regression target
    g = weights(nets.net_g)
    with pytest.raises(FloatingPointError, match="loss_g is nan"):
        dmd.dmd_step(0, nets, opt_g, opt_fake, batch, args, Accelerator(cpu=True))
    assert not changed(g, nets.net_g)


def dmd2_setup(K=1, backward_simulation=False, gan_weight=3e-3, seed=0, head_input="bottleneck"):
    """Tiny networks with DMD2's options: no pairs, GAN head on µfake, K-step generator."""
    torch.manual_seed(seed)
    backbone, scheduler = make_teacher("mnist", "v_prediction", n_feat=TINY_N_FEAT)
    net_g, mu_real, mu_fake = make_dmd_networks(backbone.eval(), scheduler, gan_head=gan_weight > 0, head_input=head_input)
    nets = dmd.Networks(net_g, mu_real, mu_fake, pseudo_huber)
    args = dmd.StepConfig(reg_weight=0, gan_weight=gan_weight, generator_steps=K, backward_simulation=backward_simulation,
                          guidance=2.0, batch_size=6)
    real = torch.utils.data.TensorDataset(torch.rand(12, 1, 28, 28) * 2 - 1, torch.arange(12) % 10)
    batch = dmd.draw_batch(torch.Generator().manual_seed(1), 0, args, (1, 28, 28), 10, net_g.T, None, real)
    return nets, args, batch


@pytest.mark.parametrize("head_input, features", [("bottleneck", "fake"), ("levels", "fake"), ("levels", "teacher")])
def test_gan_head_trains_on_its_loss_and_passes_the_generator_its_gradient(head_input, features):
    nets, args, b = dmd2_setup(head_input=head_input)
    args = dataclasses.replace(args, gan_features=features)
    opt_g, opt_fake = torch.optim.AdamW(nets.net_g.parameters(), 1e-3), torch.optim.AdamW(nets.mu_fake.parameters(), 1e-3)
    real, head = weights(nets.mu_real), weights(nets.mu_fake.head)
    # generator update: the GAN loss reaches G through µfake's head, and leaves no gradient on µfake or its head
    grads = {}
    for w in (0.0, args.gan_weight):
        nets_w = dmd.Networks(*dmd2_setup(head_input=head_input)[0].__dict__.values())
        x, stats = dmd.generator_update(nets_w, torch.optim.SGD(nets_w.net_g.parameters(), 0.0), b,
                                        dataclasses.replace(args, gan_weight=w), Accelerator(cpu=True))
        assert all(p.grad is None for p in nets_w.mu_fake.parameters())
        grads[w] = stats["grad_g"]
    assert grads[3e-3] != grads[0.0] and "loss_gan" in stats and math.isfinite(stats["loss_gan"])
    # fake score update: the head's own loss (real vs G's images) trains it, and its logged numbers are that loss
    # and D's mean probabilities on the real and on G's images (the head's logits just before the update)
    x, g_stats = dmd.generator_update(nets, opt_g, b, args, Accelerator(cpu=True))
    with torch.no_grad():
        logit_fake, logit_real = (dmd.realism(nets, nets.mu_fake, dmd.gan_inputs(nets, images, eps, b), b.t_gan, y, args)
                                  for images, eps, y in ((x, b.eps_gan[0], b.y), (b.x_real, b.eps_gan[1], b.y_real)))
    f_stats = dmd.fake_score_update(nets, opt_fake, x, b, args, Accelerator(cpu=True))
    assert changed(head, nets.mu_fake.head) and not changed(real, nets.mu_real) and "loss_gan" in g_stats
    softplus = torch.nn.functional.softplus  # loss_D = softplus(D(fake)) + softplus(-D(real)), written out
    assert f_stats["loss_disc"] == pytest.approx((softplus(logit_fake) + softplus(-logit_real)).mean().item(), rel=1e-4)
    assert f_stats["d_real"] == pytest.approx(torch.sigmoid(logit_real).mean().item(), rel=1e-4)
    assert f_stats["d_fake"] == pytest.approx(torch.sigmoid(logit_fake).mean().item(), rel=1e-4)


@pytest.mark.parametrize("features", ["fake", "teacher"])
def test_the_heads_loss_moves_mu_fakes_score_only_on_mu_fakes_own_features(features):
    """The same µfake update with and without the head's loss: on µfake's features (DMD2) the head's loss changes
    µfake's backbone too; on the frozen teacher's (--gan-features teacher) it trains the head alone, and the backbone
    learns from its denoising loss only, step for step the same."""
    backbones = []
    for disc_weight in (0.0, 1.0):
        nets, args, b = dmd2_setup(head_input="down")
        args = dataclasses.replace(args, gan_features=features, gan_disc_weight=disc_weight, grad_clip=1e9)  # no clip
        x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1  # G's images stand-in
        head = weights(nets.mu_fake.head)
        dmd.fake_score_update(nets, torch.optim.SGD(nets.mu_fake.parameters(), 1e-2), x, b, args, Accelerator(cpu=True))
        assert changed(head, nets.mu_fake.head) == (disc_weight > 0)
        backbones.append(weights(nets.mu_fake.backbone))
    same = all(torch.equal(backbones[0][k], backbones[1][k]) for k in backbones[0])
    assert same == (features == "teacher")


def test_backward_simulation_makes_inputs_at_the_chosen_timesteps():
    """Step k's input is the current G run from z through steps 0..k-1, re-noised to t_k with the batch's noise."""
    nets, args, b = dmd2_setup(K=4, backward_simulation=True, gan_weight=0)
    ts = generator_timesteps(nets.net_g.T, 4)
    assert ts == [399, 299, 199, 99]
    x_in, t_in = dmd.generator_inputs(nets, b, args)
    assert torch.equal(t_in, torch.as_tensor(ts)[b.k]) and len(set(b.k.tolist())) > 1
    with torch.no_grad():
        x = b.z
        expected = [x]
        for j in range(3):
            x = nets.net_g.add_noise(nets.net_g.x0(x, torch.full((6,), ts[j]), b.y), b.eps_steps[j], torch.full((6,), ts[j + 1]))
            expected.append(x)
    for i, k in enumerate(b.k.tolist()):
        torch.testing.assert_close(x_in[i], expected[k][i])


def test_k_step_generator_samples_with_k_network_evaluations():
    backbone, scheduler = make_teacher("mnist", "v_prediction", n_feat=TINY_N_FEAT)
    den = Denoiser(backbone.eval(), scheduler)
    calls = []
    backbone.register_forward_hook(lambda module, inputs, out: calls.append(inputs[1]))
    ts = generator_timesteps(den.T, 4)
    noise = seeded_noise(range(3), (1, 28, 28), 0, draws=4)
    x = sample_generator(den, noise, torch.tensor([1, 2, 3]), ts)
    assert len(calls) == 4 and [int(t[0]) for t in calls] == ts and x.shape == (3, 1, 28, 28)
    one = sample_generator(den, noise[0], torch.tensor([1, 2, 3]), ts[:1])  # K = 1 is the one-step generator
    torch.testing.assert_close(one, one_step(den, noise[0], torch.tensor([1, 2, 3])))


@pytest.mark.parametrize("head_input, shape", [("bottleneck", (2 * TINY_N_FEAT, 7, 7)), ("up", (TINY_N_FEAT, 14, 14))])
def test_gan_head_reads_features_that_know_t_and_y(head_input, shape):
    """The head on ContextUnet reads features the time and class embeddings have entered (the bottleneck, or the
    first up block's 14x14 map): they (and so its logit) change with t and with y for the same x_t."""
    nets, _, _ = dmd2_setup(head_input=head_input)
    mu_fake, x = nets.mu_fake, torch.randn(2, 1, 28, 28)
    t, y = torch.tensor([20, 20]), torch.tensor([3, 3])
    with torch.no_grad():
        h = mu_fake.bottleneck(x, t, y)
        assert h.shape == (2, *shape)
        assert not torch.allclose(h, mu_fake.bottleneck(x, t + 300, y))
        assert not torch.allclose(h, mu_fake.bottleneck(x, t, y + 4))
        logit = mu_fake(x, t, y, realism=True)
        assert not torch.allclose(logit, mu_fake(x, t + 300, y, realism=True))
        assert not torch.allclose(logit, mu_fake(x, t, y + 4, realism=True))
        mu_fake.head_input = "down"  # --gan-head-input down: the down path alone, blind to t and y
        assert torch.equal(mu_fake.bottleneck(x, t, y), mu_fake.bottleneck(x, t + 300, y + 4))


@pytest.mark.parametrize("head_input", ["up", "levels"])
def test_gan_head_on_other_features_trains(head_input):
    """--gan-head-input up / levels: µfake's update trains a head of those features' widths (plain SGD: AdamW's weight
    decay would move a head with no gradient from its loss); with levels, one head on each of the down path's maps
    (28x28, 14x14, 7x7), the logit the sum of theirs, and every one of them trained."""
    nets, args, b = dmd2_setup(head_input=head_input)
    mu_fake = nets.mu_fake
    heads = list(mu_fake.head.heads) if head_input == "levels" else [mu_fake.head]
    if head_input == "levels":
        x, t, y = b.x_real, b.t_gan, b.y_real
        with torch.no_grad():
            maps = mu_fake.backbone.encode(x)
            assert [h.shape[-1] for h in maps] == [28, 14, 7]
            torch.testing.assert_close(mu_fake(x, t, y, realism=True), sum(h(m, y) for h, m in zip(heads, maps)))
    before = [weights(h) for h in heads]
    stats = dmd.fake_score_update(nets, torch.optim.SGD(mu_fake.parameters(), 1e-2), b.x_real.flip(0), b, args,
                                  Accelerator(cpu=True))
    assert math.isfinite(stats["loss_disc"]) and all(changed(w, h) for w, h in zip(before, heads))


def dmd_loss_as_before(x, p_real, p_fake, h=None):
    """DMD's loss as it was before the f-divergence weighting existed (the reference for reverse KL)."""
    w = (x.detach() - p_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    g = torch.nan_to_num((p_fake - p_real) / w, nan=0.0, posinf=0.0, neginf=0.0)
    return 0.5 * torch.nn.functional.mse_loss(x, (x - g).detach()), w.flatten()


def two_steps(divergence):
    nets, args, _ = dmd2_setup()
    args = dataclasses.replace(args, divergence=divergence)
    opt_g, opt_fake = torch.optim.AdamW(nets.net_g.parameters(), 1e-3), torch.optim.AdamW(nets.mu_fake.parameters(), 1e-3)
    real = torch.utils.data.TensorDataset(torch.rand(12, 1, 28, 28) * 2 - 1, torch.arange(12) % 10)
    gen, stats = torch.Generator().manual_seed(1), []
    for step in range(2):
        b = dmd.draw_batch(gen, step, args, (1, 28, 28), 10, nets.net_g.T, None, real)
        stats.append(dmd.dmd_step(step, nets, opt_g, opt_fake, b, args, Accelerator(cpu=True))[0])
    return {**weights(nets.net_g), **weights(nets.mu_fake)}, stats


def test_reverse_kl_is_dmd_bit_for_bit_and_js_weighs(monkeypatch):
    """--divergence reverse-kl (the default) trains exactly as DMD2 did before f-distill: same weights after two
    steps as with the old loss; js, on the same draws, weighs the samples (logged r and h) and trains otherwise."""
    rkl, rkl_stats = two_steps("reverse-kl")
    js, js_stats = two_steps("js")
    with monkeypatch.context() as m:
        m.setattr(dmd, "dm_loss", dmd_loss_as_before)
        before, _ = two_steps("reverse-kl")
    assert all(torch.equal(rkl[k], before[k]) for k in rkl)
    assert "h_mean" not in rkl_stats[0] and any(not torch.equal(rkl[k], js[k]) for k in rkl)
    s = js_stats[0]
    assert 0.1 <= s["r_min"] <= s["r_mean"] <= s["r_max"] <= 20 and s["h_mean"] == pytest.approx(1.0)


@pytest.mark.parametrize("K", [1, 4])
def test_sida_step_trains_netg_and_mu_fake_and_leaves_mu_real(K):
    """--generator-loss sid with the GAN head (SiDA), one-step and K-step (backward simulation): a whole dmd_step runs,
    netG and µfake move, µreal does not, and the generator's loss is SiDA's mix, 0.5 L_SiD + 0.5 λ_GAN L_GAN."""
    nets, args, b = dmd2_setup(K=K, backward_simulation=K > 1)
    args = dataclasses.replace(args, generator_loss="sid", sid_alpha=1.0)
    opt_g, opt_fake = torch.optim.AdamW(nets.net_g.parameters(), 1e-3), torch.optim.AdamW(nets.mu_fake.parameters(), 1e-3)
    real, g, fake = weights(nets.mu_real), weights(nets.net_g), weights(nets.mu_fake)
    g_stats, f_stats = dmd.dmd_step(0, nets, opt_g, opt_fake, b, args, Accelerator(cpu=True))
    assert changed(g, nets.net_g) and changed(fake, nets.mu_fake) and not changed(real, nets.mu_real)
    assert set(g_stats) == {"loss_sid", "loss_reg", "loss_g", "loss_gan", "w", "grad_g"}
    assert all(math.isfinite(v) for v in {**g_stats, **f_stats}.values())
    mix = 0.5 * g_stats["loss_sid"] + 0.5 * args.gan_weight * g_stats["loss_gan"]
    assert g_stats["loss_g"] == pytest.approx(mix, rel=1e-5)


def test_sid_refuses_f_divergences_and_a_resume_of_another_loss(tmp_path):
    """f-distill weighs DMD's gradient, which SiD replaces: distill.py refuses the pair in one line, before any work.
    --resume of a run made with another --generator-loss (or before the flag existed: DMD) is refused too."""
    r = run("distill.py", "--run-dir", tmp_path, "--generator-loss", "sid", "--gan-weight", 3e-2, "--divergence", "js",
            check=False, limit=60)
    last_line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last_line.startswith("error: --divergence js weighs DMD's gradient")
    assert "Traceback" not in r.stderr and not (tmp_path / "dmd").exists()
    with mock.patch.object(sys, "argv", ["distill.py", "--run-dir", str(tmp_path), "--generator-loss", "sid"]):
        args = distill.parse_args()
    distill.check_same_method(args, {"generator_loss": "sid"}, "dmd")
    for saved in ({"generator_loss": "dmd"}, {}):
        with pytest.raises(UserError, match="cannot --resume dmd with --generator-loss = sid: it was made with dmd"):
            distill.check_same_method(args, saved, "dmd")
    args.generator_loss, args.guidance_t_max = "dmd", 0.8  # µreal's guidance interval is the run's too
    with pytest.raises(UserError, match="cannot --resume dmd with --guidance-t-max = 0.8: it was made with 1.0"):
        distill.check_same_method(args, {}, "dmd")


def test_k_step_warm_start_learns_every_step_from_the_pairs():
    """Regression alone with K steps: step 0 maps z_ref to x_ref, step k > 0 denoises x_ref noised to t_k (with the
    batch's fresh noise) back to x_ref; the logged loss is that regression before the update."""
    nets, (opt_g, _), _, pairs = setup()
    cfg = dmd.StepConfig(dm_weight=0, gan_weight=0, reg_weight=1, generator_steps=4, batch_size=8, seed=0)
    b = dmd.draw_batch(torch.Generator().manual_seed(3), 0, cfg, (1, 28, 28), 10, nets.net_g.T, pairs)
    assert 0 in b.k and bool((b.k > 0).any()) and not dmd.needs_real_images(cfg)
    t = torch.as_tensor(generator_timesteps(nets.net_g.T, 4))[b.k]
    x_in = torch.where((b.k == 0).view(-1, 1, 1, 1), b.z_ref, nets.net_g.add_noise(b.x_ref, b.z, t))
    with torch.no_grad():
        expected = pseudo_huber(dmd.generator(nets, x_in, t, b.y_ref), b.x_ref).item()
    g = weights(nets.net_g)
    stats, fake_stats = dmd.dmd_step(0, nets, opt_g, None, b, cfg, Accelerator(cpu=True))
    assert stats["loss_reg"] == pytest.approx(expected, rel=1e-5) and fake_stats == {} and changed(g, nets.net_g)


def test_k_step_warm_start_on_the_teachers_states():
    """--reg-step-inputs teacher: step k > 0 starts from the teacher's own DDIM state at t_k (the pairs' states[k-1])
    and regresses to x_ref; step 0 still maps z_ref to x_ref."""
    nets, (opt_g, _), _, (z, x, y, _) = setup()
    states = torch.randn(len(z), 3, 1, 28, 28)
    cfg = dmd.StepConfig(dm_weight=0, gan_weight=0, reg_weight=1, generator_steps=4, batch_size=8, seed=0,
                         reg_step_inputs="teacher")
    b = dmd.draw_batch(torch.Generator().manual_seed(3), 0, cfg, (1, 28, 28), 10, nets.net_g.T, (z, x, y, states))
    assert 0 in b.k and bool((b.k > 0).any())
    t = torch.as_tensor(generator_timesteps(nets.net_g.T, 4))[b.k]
    x_in = torch.stack([b.z_ref[i] if k == 0 else b.s_ref[i, k - 1] for i, k in enumerate(b.k.tolist())])
    with torch.no_grad():
        expected = pseudo_huber(dmd.generator(nets, x_in, t, b.y_ref), b.x_ref).item()
    stats, _ = dmd.dmd_step(0, nets, opt_g, None, b, cfg, Accelerator(cpu=True))
    assert stats["loss_reg"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss", ["dmd", "sid"])
def test_mu_real_is_guided_only_inside_the_guidance_interval(loss):
    """--guidance-t-max: the real score is the guided teacher at t <= t_max T and the plain conditional teacher above
    it, sample by sample, in DMD's loss and SiD's; at 1 (the default) every t is guided, as before the flag."""
    nets, (opt_g, _), args, _ = setup()
    T = nets.net_g.T
    args = dataclasses.replace(args, guidance_t_max=0.5, generator_loss=loss)
    b = dmd.draw_batch(torch.Generator().manual_seed(0), 0, args, (1, 28, 28), 10, T)
    b.t_dm = torch.tensor([0, T // 2, T // 2 + 1, T - 1])
    s = dmd.real_guidance(nets, b, args)
    assert s.tolist() == [2.0, 2.0, 1.0, 1.0] and dmd.real_guidance(nets, b, dataclasses.replace(args, guidance_t_max=1)) == 2.0
    assert dmd.real_guidance(nets, b, dataclasses.replace(args, guidance=1.0)) == 1.0  # unguided anyway: one pass
    with torch.no_grad():  # one scale per sample: the guided teacher's rows where s = 2, the unguided one's where s = 1
        x_t = torch.randn(4, 1, 28, 28)
        mixed, guided, plain = (nets.mu_real.x0(x_t, b.t_dm, b.y, g) for g in (s, 2.0, 1.0))
    assert not torch.allclose(guided, plain)
    torch.testing.assert_close(mixed, torch.cat([guided[:2], plain[2:]]))
    calls, x0 = [], nets.mu_real.x0
    with mock.patch.object(nets.mu_real, "x0", side_effect=lambda *a: calls.append(a[3]) or x0(*a)):
        dmd.generator_update(nets, opt_g, b, args, Accelerator(cpu=True))
    assert len(calls) == 1 and torch.equal(calls[0], s)
