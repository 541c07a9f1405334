"""The DMD step of dmd.py, in-process on tiny networks."""
import argparse
import math

import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_N_FEAT

import dmd
from losses import pseudo_huber
from models import make_dmd_networks, make_teacher


def setup(gen_every=1, seed=0):
    torch.manual_seed(seed)
    backbone, scheduler = make_teacher("mnist", "v_prediction", n_feat=TINY_N_FEAT)
    net_g, mu_real, mu_fake = make_dmd_networks(backbone.eval(), scheduler)
    nets = dmd.Networks(net_g, mu_real, mu_fake, pseudo_huber)
    args = dmd.add_arguments(argparse.ArgumentParser()).parse_args(["--gen-every", str(gen_every)])
    args.guidance, args.batch_size, args.seed = 2.0, 4, 0
    opts = torch.optim.AdamW(net_g.parameters(), 1e-3), torch.optim.AdamW(mu_fake.parameters(), 1e-3)
    n = 8
    pairs = (torch.randn(n, 1, 28, 28), torch.rand(n, 1, 28, 28) * 2 - 1, torch.arange(n) % 10)
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


def test_batch_is_a_slice_of_the_global_batch():
    """Two processes with batch B/2 draw exactly the halves of one process's batch B (N x B/N == 1 x B)."""
    _, _, args, pairs = setup()
    one = dmd.draw_batch(torch.Generator().manual_seed(3), 5, args, (1, 28, 28), 10, 400, pairs)
    for rank in (0, 1):
        part = dmd.draw_batch(torch.Generator().manual_seed(3), 5, args, (1, 28, 28), 10, 400, pairs, rank, 2)
        for name in ("z", "y", "t_dm", "eps_dm", "t_fake", "eps_fake", "z_ref", "x_ref", "y_ref"):
            assert torch.equal(getattr(part, name), getattr(one, name)[rank::2]), name


def test_non_finite_loss_stops_before_the_weights_change():
    nets, (opt_g, opt_fake), args, pairs = setup()
    batch = dmd.draw_batch(torch.Generator().manual_seed(0), 0, args, (1, 28, 28), 10, nets.net_g.T, pairs)
    batch.x_ref[0, 0, 0, 0] = float("nan")  # the regression target
    g = weights(nets.net_g)
    with pytest.raises(FloatingPointError, match="loss_g is nan"):
        dmd.dmd_step(0, nets, opt_g, opt_fake, batch, args, Accelerator(cpu=True))
    assert not changed(g, nets.net_g)
