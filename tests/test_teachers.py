"""The teachers people have now: flow matching (FlowMatchEulerDiscreteScheduler) and latent diffusion (a VAE beside a
UNet or a DiT), in as diffusers folders and out as diffusers pipelines. The schedule object (schedules.py) is held
against diffusers' own schedulers; every script runs end to end on tiny teachers of each kind, and the exported
pipeline, loaded in a fresh process with diffusers alone, makes sample.py's images."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, fake_images, read_json, run
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, DiTPipeline,
                       FlowMatchEulerDiscreteScheduler, PNDMScheduler, UNet2DModel)

import models
from cli import UserError
from schedules import make_schedule

SIZE = 16
TINY_DIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8}
TINY_VAE = ["--block-out-channels", "8,16", "--layers-per-block", 1, "--latent-channels", 4]


def flow_sched(shift=3.0, T=1000):
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)


def test_flow_schedule_is_the_schedulers_own():
    """FlowSchedule at shift 3: its σ_t are the scheduler's training sigmas (t ascending), its network timesteps the
    scheduler's timesteps, x_t = (1-σ) x0 + σ ε is scale_noise's, the velocity target ε - x0 gives back x0 through
    to_x0, and its sampler is Euler on the scheduler's own step: one step from z is x̂0 = z - v̂, N steps are
    x <- x + (σ' - σ) v̂ on the grid's sigmas down to 0."""
    sched = flow_sched()
    s = make_schedule(sched)
    assert s.kind == "flow" and s.prediction_type == "flow"
    torch.testing.assert_close(s.sigmas.float(), sched.sigmas.flip(0), rtol=0, atol=1e-6)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(s.model_timestep(t), sched.timesteps.flip(0)[t], rtol=0, atol=1e-3)
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, sched.scale_noise(x0, sched.timesteps.flip(0)[t], eps), rtol=0, atol=1e-5)
    torch.testing.assert_close(s.to_x0(x_t, t, s.target(x0, eps, t)), x0, rtol=0, atol=1e-5)
    v = torch.randn(4, 3, 8, 8)
    step = s.sampler(1)
    torch.testing.assert_close(step(v, 0, eps), eps - v, rtol=0, atol=1e-6)  # σ_{T-1} = 1 -> 0
    grid = s.sampling_timesteps(4)
    assert grid == [999, 749, 499, 249]
    step, x, expected = s.sampler(4), eps, eps
    sigmas = [float(s.sigmas[t]) for t in grid] + [0.0]
    for i in range(4):
        x, expected = step(v, i, x), expected + (sigmas[i + 1] - sigmas[i]) * v
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_schedule_is_the_schedulers_own(prediction_type):
    """DDPMSchedule: x_t is DDPMScheduler.add_noise's, the v target get_velocity's, to_x0 inverts each target; a
    PNDMScheduler or DDIMScheduler config (SD's folders) gives the same ᾱ."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    s = make_schedule(sched)
    t, x0, eps = torch.tensor([0, 10, 500, 999]), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(s.add_noise(x0, eps, t), sched.add_noise(x0, eps, t), rtol=0, atol=1e-5)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(s.target(x0, eps, t), sched.get_velocity(x0, eps, t), rtol=0, atol=1e-5)
    torch.testing.assert_close(s.to_x0(s.add_noise(x0, eps, t), t, s.target(x0, eps, t)), x0, rtol=0, atol=1e-3)
    for other in (PNDMScheduler, DDIMScheduler):
        assert torch.equal(make_schedule(other.from_config(sched.config)).alphas_cumprod, s.alphas_cumprod)


def test_unknown_schedules_are_refused_in_one_line():
    """A scheduler of another class, and a flow scheduler whose sigmas depend on the resolution, are refused with the
    classes known / the fix."""
    from diffusers import CMStochasticIterativeScheduler
    with pytest.raises(UserError, match="CMStochasticIterativeScheduler, whose noise schedule .* known are the DDPM "
                                        "family .*FlowMatchEulerDiscreteScheduler"):
        make_schedule(CMStochasticIterativeScheduler())
    with pytest.raises(UserError, match="use_dynamic_shifting"):
        make_schedule(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def class_folders(root, n=6):
    for name in ("cat", "dog"):
        fake_images(root / name, n=n, size=20)
    return root


def pipeline_folder(folder, unet, scheduler, vae=None):
    """A teacher as a diffusers user keeps one: model_index.json, unet/, scheduler/ (and vae/), made by diffusers alone."""
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    if vae is not None:
        vae.save_pretrained(folder / "vae")
    index = dict(_class_name="DiffusionPipeline", unet=["diffusers", "UNet2DModel"],
                 scheduler=["diffusers", type(scheduler).__name__])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """A class-conditional 16x16 RGB UNet2DModel on a FlowMatchEulerDiscreteScheduler (shift 3), as diffusers saves
    them, and images in two class subfolders: precompute, the warm start, DMD2 with the GAN."""
    root = tmp_path_factory.mktemp("flow")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, num_class_embeds=3, **TINY_UNET)
    unet.register_to_config(_null_class_label=2)
    teacher, data, r = pipeline_folder(root / "teacher", unet, flow_sched()), class_folders(root / "data"), root / "run"
    flags = ["--teacher", teacher, "--run-dir", r]
    run("precompute.py", *flags, "--num-pairs", 8, "--sampling-steps", 2)
    run("distill.py", *flags, "--out", "kd", "--reg-weight", 1, "--dm-weight", 0, "--reg-loss", "pseudo_huber",
        "--steps", 2, "--batch-size", 4, "--probe-every", 0)
    run("distill.py", *flags, "--data-dir", data, "--generator-init", r / "kd" / "student", "--reg-weight", 0,
        "--gan-weight", 1e-2, "--steps", 2, "--batch-size", 4, "--probe-every", 0)
    return root


PIPELINE_SNIPPET = """
import sys
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
n, K = 4, int(sys.argv[2])
images = pipe(batch_size=n, class_labels=[i % 2 for i in range(n)], num_inference_steps=K,
              generator=[torch.Generator().manual_seed(i) for i in range(n)], output_type="np").images
np.save(sys.argv[3], images)
ours = [m for m in ("models", "checkpoints", "schedules", "contextunet", "dmd", "sampling", "cli") if m in sys.modules]
assert not ours, ours
"""


def pipeline_matches_sample_py(run_dir, teacher, K, tmp_path):
    """sample.py's images of the student against its pipeline's, made in a fresh process that imports only diffusers
    and torch, on the same seeds: the largest difference, on the [0, 1] scale."""
    run("sample.py", "--teacher", teacher, "--run-dir", run_dir, "--model", "student", "--num-samples", 4,
        "--out", tmp_path / "s")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", PIPELINE_SNIPPET, str(run_dir / "dmd" / "pipeline"), str(K),
                        str(tmp_path / "p.npy")], cwd=tmp_path, env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ours, theirs = np.load(tmp_path / "s" / "samples.npz")["images"] / 255.0, np.load(tmp_path / "p.npy")
    assert ours.shape == theirs.shape
    return np.abs(ours - theirs).max()


def test_flow_teacher_is_distilled_as_flow_and_exported_with_its_scheduler(flow_run, tmp_path):
    """A flow teacher through --teacher DIR is read as flow matching everywhere: the pairs are its Euler sampler's,
    the student's config says so, its folders keep the FlowMatchEulerDiscreteScheduler, and its pipeline (with that
    scheduler, stochastic at K = 2 for DMD2's re-noising) makes sample.py's images within 1/255, at 1 and 2 steps."""
    r, teacher = flow_run / "run", flow_run / "teacher"
    meta, config = read_json(r / "pairs" / "meta.json"), read_json(r / "dmd" / "config.json")
    assert meta["prediction_type"] == config["prediction_type"] == "flow" and meta["sampler"] == "euler"
    for folder in (r / "dmd" / "student", r / "dmd" / "pipeline" / "scheduler"):
        sched = read_json(folder / "scheduler_config.json")
        assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 3.0
    assert pipeline_matches_sample_py(r, teacher, 1, tmp_path / "k1") <= 1 / 255 + 1e-6
    assert "trust_remote_code=True)  # runs pipeline_generator.py" in (r / "dmd" / "pipeline" / "README.md").read_text()
    r2 = tmp_path / "k2"
    run("distill.py", "--teacher", teacher, "--run-dir", r2, "--steps", 2, "--batch-size", 4, "--reg-weight", 0,
        "--generator-steps", 2, "--backward-simulation", "--probe-every", 0)
    assert read_json(r2 / "dmd" / "pipeline" / "scheduler" / "scheduler_config.json")["stochastic_sampling"]
    assert pipeline_matches_sample_py(r2, teacher, 2, tmp_path / "k2") <= 1 / 255 + 1e-6


def test_flow_teacher_evaluates_and_refuses_ddpm_sampling(flow_run):
    """The yardstick on a flow teacher (its Euler rows, the students), and --full-ddpm refused in one line."""
    r, teacher, data = flow_run / "run", flow_run / "teacher", flow_run / "data"
    run("evaluate.py", "--fid", "--teacher", teacher, "--run-dir", r, "--data-dir", data, "--num-samples", 4,
        "--batch-size", 4, "--classifier-epochs", 1, "--ddim-steps", 1, "--teacher-guidance", 2, "--extend-rows", 0)
    rows = {row["model"]: row for row in read_json(r / "eval" / "report.json")["rows"]}
    assert {"teacher-g2-ddim-1", "onestep-before", "student"} <= set(rows) and all(
        math.isfinite(row["fid"]) for row in rows.values())
    bad = run("sample.py", "--teacher", teacher, "--run-dir", r, "--full-ddpm", check=False, limit=60)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: full ancestral DDPM")


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """train_vae.py and a latent DiT teacher (train_teacher.py --vae --backbone dit) on 16x16 RGB images in two class
    subfolders, then the pairs, the warm start and DMD2 with the GAN head on the DiT's middle tokens."""
    root = tmp_path_factory.mktemp("latent")
    data, r = class_folders(root / "data"), root / "run"
    common = ["--run-dir", r, "--data-dir", data, "--image-size", SIZE]
    run("train_vae.py", *common, *TINY_VAE, "--max-steps", 3, "--batch-size", 4, "--warmup-steps", 0)
    run("train_teacher.py", *common, "--vae", r / "vae", "--backbone", "dit", "--unet-config", json.dumps(TINY_DIT),
        "--max-steps", 3, "--batch-size", 4, "--sampling-steps", 2, "--prediction-type", "v_prediction")
    flags = ["--teacher", r / "teacher", "--run-dir", r]
    run("precompute.py", *flags, "--num-pairs", 8, "--sampling-steps", 2)
    run("distill.py", *flags, "--out", "kd", "--reg-weight", 1, "--dm-weight", 0, "--reg-loss", "pseudo_huber",
        "--steps", 2, "--batch-size", 4, "--probe-every", 0)
    return root


def test_latent_teacher_end_to_end(latent_run, tmp_path, monkeypatch):
    """A latent teacher trained here: its folder holds vae/, netG learns latents of the VAE's shape, and every image a
    user sees is decoded: the pairs' preview, evaluate.py's rows (pixels, the classifier of pixels), sample.py's
    files, the pipeline's images (sample.py's within 1/255, in a fresh process). DMD2 encodes the real images once
    (cached in <run-dir>/latents: a second run encodes none) and decodes only for its sample grids."""
    r, data = latent_run / "run", latent_run / "data"
    teacher = r / "teacher"
    assert read_json(teacher / "vae" / "config.json")["_class_name"] == "AutoencoderKL"
    assert read_json(r / "pairs" / "meta.json")["shape"] == [4, SIZE // 2, SIZE // 2]
    calls = {"encode": 0, "decode": 0}
    for name in calls:
        method = getattr(models.Autoencoder, name)
        monkeypatch.setattr(models.Autoencoder, name, lambda self, *a, _m=method, _n=name, **k: (
            calls.__setitem__(_n, calls[_n] + 1), _m(self, *a, **k))[1])
    dmd2 = ["--teacher", teacher, "--run-dir", r, "--data-dir", data, "--generator-init", r / "kd" / "student",
            "--reg-weight", 0, "--gan-weight", 1e-2, "--steps", 4, "--batch-size", 4, "--probe-every", 0,
            "--sample-every", 100]
    run("distill.py", *dmd2)
    assert calls["encode"] == 1 and calls["decode"] == 2  # the 12 real images: one batch; grids: before, the last step
    assert len(os.listdir(r / "latents")) == 2  # the teacher's training data (its VAE), and distill's real images
    run("distill.py", *dmd2, "--overwrite")
    assert calls["encode"] == 1  # cached
    run("evaluate.py", "--fid", "--teacher", teacher, "--run-dir", r, "--data-dir", data, "--num-samples", 4,
        "--batch-size", 4, "--classifier-epochs", 1, "--ddim-steps", 1, "--teacher-guidance", 2, "--extend-rows", 0)
    report = read_json(r / "eval" / "report.json")
    assert all(math.isfinite(row["fid"]) for row in report["rows"]) and "student" in [x["model"] for x in report["rows"]]
    assert read_json(r / "classifier" / "config.json")["in_channels"] == 3  # features of decoded pixels
    assert pipeline_matches_sample_py(r, teacher, 1, tmp_path) <= 1 / 255 + 1e-6
    assert np.load(tmp_path / "s" / "samples.npz")["images"].shape == (4, SIZE, SIZE, 3)


def test_latent_dit_student_also_runs_in_ditpipeline(latent_run):
    """The DiT student's folder is DiTPipeline-shaped (transformer/, vae/, scheduler/): diffusers' own DiTPipeline made
    of its components (one DDIM step, guidance_scale 1: the student is unguided) gives the GeneratorPipeline's
    images."""
    pipe = DiffusionPipeline.from_pretrained(str(latent_run / "run" / "dmd" / "pipeline"), trust_remote_code=True)
    dit = DiTPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler)
    seeds = [torch.Generator().manual_seed(i) for i in range(4)]
    ours = pipe(batch_size=4, class_labels=[0, 1, 0, 1], num_inference_steps=1, generator=seeds, output_type="np").images
    seeds = [torch.Generator().manual_seed(i) for i in range(4)]
    theirs = dit(class_labels=[0, 1, 0, 1], guidance_scale=1, num_inference_steps=1, generator=seeds,
                 output_type="np").images
    assert np.abs(ours - theirs).max() < 1e-5


def test_latent_unet_folder_from_diffusers(tmp_path):
    """The folder a diffusers user has for a latent UNet teacher (vae/ + a 4-channel unet/ + DDPMScheduler; today's
    traceback in add_noise) is a latent teacher: pairs of latents, a student of latents, images of pixels."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=SIZE)
    unet = UNet2DModel(sample_size=SIZE // 2, in_channels=4, out_channels=4, **TINY_UNET)
    teacher = pipeline_folder(tmp_path / "teacher", unet, DDPMScheduler(clip_sample=False), vae)
    r = tmp_path / "run"
    run("precompute.py", "--teacher", teacher, "--run-dir", r, "--num-pairs", 4, "--sampling-steps", 2)
    run("distill.py", "--teacher", teacher, "--run-dir", r, "--steps", 2, "--batch-size", 4, "--reg-loss", "pseudo_huber",
        "--probe-every", 0)
    run("sample.py", "--teacher", teacher, "--run-dir", r, "--model", "student", "--num-samples", 4, "--out", r / "s")
    assert read_json(r / "pairs" / "meta.json")["shape"] == [4, 8, 8]
    assert np.load(r / "s" / "samples.npz")["images"].shape == (4, SIZE, SIZE, 3)
    assert (r / "dmd" / "student" / "vae" / "config.json").is_file()  # a student folder makes images on its own


def test_dit_gan_head_reads_its_middle_tokens_as_a_map():
    """Denoiser.bottleneck of a DiT: the tokens after its middle transformer block laid out as the patch grid (B, inner
    dim, h/p, w/p), which know x_t, t and y; DMD2's head takes them."""
    torch.manual_seed(0)
    backbone, scheduler = models.make_teacher("custom", "v_prediction", shape=(4, 8, 8), num_classes=3, backbone="dit",
                                              unet=TINY_DIT)
    net_g, mu_real, mu_fake = models.make_dmd_networks(backbone.eval(), scheduler, gan_head=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 2])
    with torch.no_grad():
        h = mu_fake.bottleneck(x, t, y)
        assert h.shape == (2, 16, 4, 4)  # inner dim 2 x 8, 8x8 latents in 2x2 patches
        assert not torch.allclose(h, mu_fake.bottleneck(x, t.flip(0), y)) and not torch.allclose(
            h, mu_fake.bottleneck(x, t, y.flip(0)))
        assert mu_fake(x, t, y, realism=True).shape == (2,)
