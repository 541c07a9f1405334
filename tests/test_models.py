import copy
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_N_FEAT, TINY_UNET, run
from diffusers import UNet2DModel

import cli
from checkpoints import load_teacher, save_teacher
from models import CIFAR10_UNET, Denoiser, count_params, make_dmd_networks, make_teacher
from recipes import PRESETS
from sampling import one_step, sample_teacher


@pytest.mark.parametrize("dataset, expected, tolerance", [("mnist", 6_585_601, 0), ("cifar10", 35_746_307, 0),
                                                          ("celeba", 426_691, 0.05)])
def test_parameter_counts(dataset, expected, tolerance):
    backbone, _ = make_teacher(dataset)
    assert abs(count_params(backbone) - expected) <= tolerance * expected


def test_cifar10_config_is_the_hub_models():
    """The UNet built from CIFAR10_UNET behaves as google/ddpm-cifar10-32 (DESIGN.md's facts), read from the built
    network rather than from the constant: channels (128, 256, 256, 256), 2 layers per block, attention in the down and
    up paths at 16x16 only, sinusoidal time embedding with sin first (flip_sin_to_cos False) and frequency shift 1,
    downsampling convs with no padding of their own (downsample_padding 0), GroupNorm eps 1e-6."""
    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR10_UNET).eval()
    assert [block.resnets[0].out_channels for block in unet.down_blocks] == [128, 256, 256, 256]
    assert [len(block.resnets) for block in unet.down_blocks] == [2, 2, 2, 2]
    sizes = []  # the resolution of every down- and up-path attention's input
    for block in (*unet.down_blocks, *unet.up_blocks):
        for attention in getattr(block, "attentions", None) or []:
            attention.register_forward_pre_hook(lambda module, args: sizes.append(tuple(args[0].shape[-2:])))
    t = torch.tensor([0.0, 10.0, 999.0])
    with torch.no_grad():
        assert unet(torch.randn(3, 3, 32, 32), t).sample.shape == (3, 3, 32, 32)
        embedding = unet.time_proj(t)
    assert sizes == [(16, 16)] * 5  # 2 attentions in the down block at 16x16, 3 in the up block
    half = 64  # block_out_channels[0] / 2 frequencies
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / (half - 1))  # freq_shift 1: divide by half - 1
    torch.testing.assert_close(embedding, torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1))
    assert all(block.downsamplers[0].conv.padding == (0, 0) for block in unet.down_blocks[:-1])
    assert {m.eps for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-6}


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_save_from_pretrained_round_trip(tmp_path, dataset):
    """save_pretrained -> from_pretrained through the project's loader gives bit-identical outputs."""
    torch.manual_seed(1)
    backbone, scheduler = make_teacher(dataset, "v_prediction", n_feat=TINY_N_FEAT, unet=TINY_UNET)
    backbone.eval()
    save_teacher(backbone, scheduler, str(tmp_path / "t"))
    loaded, loaded_sched, _, _ = load_teacher(str(tmp_path / "t"))
    assert type(loaded) is type(backbone) and loaded_sched.config.prediction_type == "v_prediction"
    x, t = torch.randn(3, *PRESETS[dataset]["shape"]), torch.tensor([0, 100, 399])
    y = torch.tensor([0, 5, 10]) if dataset == "mnist" else None
    with torch.no_grad():
        assert torch.equal(backbone(x, t, class_labels=y).sample, loaded(x, t, class_labels=y).sample)


def test_contextunet_runs_channels_last_with_the_same_outputs_and_weights(tmp_path):
    """Denoiser lays a ContextUnet's weights out channels-last (faster on CPU); the outputs stay those of the
    contiguous layout up to float rounding, gradients too, and the saved weights are the same numbers."""
    torch.manual_seed(0)
    backbone, scheduler = make_teacher("mnist", "v_prediction", n_feat=8)
    reference = copy.deepcopy(backbone)
    den = Denoiser(backbone, scheduler)
    conv = den.backbone.down1[0].conv1[0].weight  # (init_conv's one input channel is both layouts at once)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x_t, t, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 50, 250, 399]), torch.tensor([0, 3, 7, 10])
    out, expected = den(x_t, t, y), reference(x_t, t, class_labels=y).sample
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    scale = max(q.grad.abs().max().item() for q in reference.parameters())  # (a conv's bias before BatchNorm has a
    for (name, p), q in zip(den.backbone.named_parameters(), reference.parameters()):  # gradient of rounding noise)
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5 * scale, msg=name)  # every layer, ConvTranspose too
    save_teacher(den.backbone, scheduler, str(tmp_path / "t"))
    loaded, _, _, _ = load_teacher(str(tmp_path / "t"))
    saved, kept = loaded.state_dict(), den.backbone.state_dict()
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), reference.parameters()))  # no step was taken


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_matches_formula_in_float64(prediction_type):
    torch.manual_seed(0)
    backbone, scheduler = make_teacher("mnist", prediction_type, n_feat=8)
    den = Denoiser(backbone.eval(), scheduler)
    x_t, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 50, 250, 399])
    with torch.no_grad():
        out = den(x_t, t).double()
    a = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    expected = {"epsilon": (x_t.double() - (1 - a).sqrt() * out) / a.sqrt(),
                "v_prediction": a.sqrt() * x_t.double() - (1 - a).sqrt() * out,
                "sample": out}[prediction_type]
    with torch.no_grad():
        got = den.x0(x_t, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6 * expected.abs().max().item())


def test_guidance_formula():
    torch.manual_seed(0)
    backbone, scheduler = make_teacher("mnist", n_feat=8)
    den = Denoiser(backbone.eval(), scheduler)
    x_t, t, y = torch.randn(3, 1, 28, 28), torch.tensor([10, 20, 30]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        cond, uncond = den.x0(x_t, t, y), den.x0(x_t, t, torch.full_like(y, 10))
        for s in (1.0, 2.0, 3.5):
            torch.testing.assert_close(den.x0(x_t, t, y, s), uncond + s * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_dmd_networks_and_one_step_generator():
    backbone, scheduler = make_teacher("mnist", "v_prediction", n_feat=8)
    net_g, mu_real, mu_fake = make_dmd_networks(backbone.eval(), scheduler)
    assert not any(p.requires_grad for p in mu_real.parameters())
    assert all(p.requires_grad for p in net_g.parameters()) and all(p.requires_grad for p in mu_fake.parameters())
    assert net_g.backbone is not mu_real.backbone and mu_fake.backbone is not mu_real.backbone
    z, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 4])
    calls = []
    hook = net_g.backbone.register_forward_pre_hook(lambda module, args: calls.append(args[1].unique().tolist()))
    with torch.no_grad():
        x = one_step(net_g, z, y)
        hook.remove()
        v = net_g.backbone(z, torch.tensor([399, 399]), class_labels=y).sample.double()
    assert calls == [[399]]  # one network evaluation, at t = T-1 for every sample
    a = scheduler.alphas_cumprod.double()[399]  # x̂0 of a v-prediction network: sqrt(a) x_t - sqrt(1 - a) v
    torch.testing.assert_close(x.double(), a.sqrt() * z.double() - (1 - a).sqrt() * v, rtol=0, atol=1e-5)


def test_ddim_matches_formula():
    """diffusers' DDIM (eta 0, trailing spacing) against x_{t'} = sqrt(a') x̂0 + sqrt(1 - a') ε̂ written out."""
    torch.manual_seed(0)
    backbone, scheduler = make_teacher("mnist", "epsilon", n_feat=8)
    scheduler.register_to_config(clip_sample=False)
    den = Denoiser(backbone.eval(), scheduler)
    z, y, steps = torch.randn(2, 1, 28, 28), torch.tensor([1, 2]), 4
    got = sample_teacher(den, z, y, steps, s=1.5)
    a = scheduler.alphas_cumprod.double()
    ts = [399, 299, 199, 99]  # trailing spacing: T - 1 down in T / steps strides
    x = z.double()
    with torch.no_grad():
        for i, t in enumerate(ts):
            eps = den.guided(x.float(), torch.tensor(t), y, 1.5).double()
            x0 = (x - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
            a_prev = a[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


TIMED_SCRIPT = """
import runpy, sys, time
import checkpoints, sampling  # the heavy imports first: only the script's own work is timed
sys.argv = sys.argv[1:]
t0 = time.perf_counter()
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print(f"seconds {time.perf_counter() - t0:.2f}", file=sys.stderr)
"""


def test_offline_hub_id_fails_at_once_with_one_line(tmp_path):
    """A hub teacher on a machine without network: one line naming the fix, within seconds of the script's start,
    where the download itself would retry for ~25 s. huggingface_hub is pointed at a closed local port (connections
    refused, as with no network), its offline mode off and its cache empty. (Offline mode's own message is in
    test_reliability's bad-input table.)"""
    with socket.socket() as s:  # a port nobody listens on: connections to it are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="0",
               HF_ENDPOINT=f"http://127.0.0.1:{port}")
    r = subprocess.run([sys.executable, "-c", TIMED_SCRIPT, os.path.join(ROOT, "sample.py"), "--dataset", "cifar10",
                        "--run-dir", str(tmp_path / "run"), "--num-samples", "1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-2].startswith("error: hub id 'google/ddpm-cifar10-32'") and "--teacher" in lines[-2], lines[-3:]
    assert float(lines[-1].split()[1]) < 5, lines[-1]


def test_teacher_folder_without_weights(tmp_path):
    (tmp_path / "teacher").mkdir()
    r = run("sample.py", "--run-dir", tmp_path, check=False)
    assert r.returncode == 2 and "has no diffusion_pytorch_model.safetensors" in r.stderr


FREED_MB = ("import sys, torch\n"
            "{setup}\n"
            "rss = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) // 1024\n"
            "x = torch.ones(64 * 2 ** 20)\nbefore = rss()\ndel x\nprint(before - rss())")


def freed_mb(setup):
    """MB that a fresh Python process hands back to the OS when it frees a 256 MB tensor, after running `setup`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", FREED_MB.format(setup=setup)], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")
def test_keep_freed_memory_keeps_it_and_importing_changes_nothing():
    """cli.keep_freed_memory: a freed 256 MB tensor stays resident, so the next one needs no page faults. Importing
    every module of the project must not do that (no process-wide side effect on import): glibc's default behaviour,
    handing it back at once, must survive the imports."""
    modules = "checkpoints, cli, contextunet, data, dmd, files, losses, metrics, models, recipes, sampling"
    assert freed_mb(f"import {modules}") > 200  # glibc's default: given back
    assert freed_mb("import cli; cli.keep_freed_memory()") < 64  # kept


def test_keep_freed_memory_leaves_users_malloc_settings_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    monkeypatch.setattr(cli.ctypes, "CDLL", lambda name: calls.append(name))
    cli.keep_freed_memory()
    assert calls == []
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    with pytest.raises(AttributeError):  # now it does reach for libc (the fake has no mallopt)
        cli.keep_freed_memory()
    assert calls == ["libc.so.6"]
