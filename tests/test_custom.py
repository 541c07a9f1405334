"""Your own teacher and data in, a diffusers pipeline out: a class-conditional UNet2DModel saved the way diffusers'
own examples save it (DDPMPipeline.save_pretrained) and PNGs in class subfolders, with no --dataset; the student
loaded back by DiffusionPipeline.from_pretrained (the MNIST ContextUnet's too, from anywhere, as its model card
says); bf16 that keeps the amplified x̂0 path in float32."""
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, fake_images, read_json, run
from accelerate.utils import convert_outputs_to_fp32
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from huggingface_hub import constants as hub_constants
from PIL import Image

from checkpoints import load_teacher, save_pipeline, save_student, weights_hash
from cli import UserError
from models import Denoiser, class_labels_of, make_teacher
from sampling import one_step


def custom_teacher(folder, null_class=True, seed=0):
    """A tiny 48x48 RGB UNet2DModel with 2 classes (plus the null class of guidance, where `null_class`), saved as a
    pipeline folder: model_index.json, unet/, scheduler/."""
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=48, in_channels=3, out_channels=3, num_class_embeds=3 if null_class else 2, **TINY_UNET)
    if null_class:
        unet.register_to_config(_null_class_label=2)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """A pipeline-folder teacher, PNGs of another size in class subfolders (one of them grey), and a finished run."""
    root = tmp_path_factory.mktemp("custom")
    teacher, data, r = custom_teacher(root / "teacher_pipe"), root / "data", root / "run"
    for name in ("cat", "dog"):
        fake_images(data / name, n=9, size=40)
    Image.fromarray(np.full((30, 50), 128, np.uint8)).save(data / "dog" / "grey.png")
    flags = ["--teacher", teacher, "--run-dir", r]
    run("precompute.py", *flags, "--num-pairs", 8, "--sampling-steps", 2)
    run("distill.py", *flags, "--data-dir", data, "--steps", 2, "--batch-size", 4, "--reg-loss", "pseudo_huber",
        "--gan-weight", 1e-2, "--probe-every", 0)
    return root


def test_own_teacher_and_data_end_to_end(custom):
    """precompute, distill, evaluate and sample with --teacher (and --data-dir), no --dataset: shape, classes and the
    null class come from the teacher, labels from the subfolders."""
    r, teacher, data = custom / "run", custom / "teacher_pipe", custom / "data"
    meta = read_json(r / "pairs" / "meta.json")
    assert meta["shape"] == [3, 48, 48] and meta["num_classes"] == 2 and meta["guidance"] == 2.0 and meta["dataset"] == "custom"
    config = read_json(r / "dmd" / "config.json")
    assert config["dataset"] == "custom" and config["num_classes"] == 2 and config["gan_weight"] == 1e-2
    run("evaluate.py", "--fid", "--teacher", teacher, "--run-dir", r, "--data-dir", data, "--num-samples", 4,
        "--batch-size", 4, "--classifier-epochs", 1, "--ddim-steps", "1", "--extend-rows", 0)  # the grid alone
    rows = {row["model"]: row for row in read_json(r / "eval" / "report.json")["rows"]}
    assert list(rows) == ["real", "teacher-g1.5-ddim-1", "teacher-g2-ddim-1", "teacher-g2-ddim-2", "teacher-g2.5-ddim-1",
                          "onestep-before", "onestep-before-guided", "student"]
    # the share of the 4 samples put in their requested class (k / 4); real images request none
    assert all(rows[name]["class_accuracy"] in (0, 0.25, 0.5, 0.75, 1) for name in rows if name != "real")
    assert rows["real"]["class_accuracy"] is None
    assert "Evaluation" in (r / "dmd" / "pipeline" / "README.md").read_text()  # the model card got the numbers
    run("sample.py", "--teacher", teacher, "--run-dir", r, "--model", "student", "--num-samples", 4, "--out", r / "s")
    assert np.load(r / "s" / "samples.npz")["images"].shape == (4, 48, 48, 3)


PIPELINE_SNIPPET = """
import sys
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
n, K = 4, int(sys.argv[2])
images = pipe(batch_size=n, class_labels=[i % 2 for i in range(n)], num_inference_steps=K,
              generator=[torch.Generator().manual_seed(i) for i in range(n)], output_type="np").images
np.save(sys.argv[3], images)
ours = [m for m in ("models", "checkpoints", "contextunet", "dmd", "sampling", "cli", "files") if m in sys.modules]
assert not ours, ours
"""


@pytest.mark.parametrize("K", [1, 2])
def test_student_pipeline_matches_sample_py(custom, tmp_path, K):
    """DiffusionPipeline.from_pretrained("<run>/dmd/pipeline") in a fresh process that imports only diffusers and torch
    (not from the repository) makes the images sample.py makes on the same seeds, within 1/255: one step (DDIM,
    trailing) and K = 2 steps (LCM's re-noising, as the K-step generator samples)."""
    r, teacher = custom / "run", custom / "teacher_pipe"
    if K > 1:
        r = tmp_path / "run"
        run("distill.py", "--teacher", teacher, "--run-dir", r, "--steps", 2, "--batch-size", 4, "--reg-weight", 0,
            "--generator-steps", K, "--backward-simulation", "--probe-every", 0, "--reg-loss", "pseudo_huber")
    run("sample.py", "--teacher", teacher, "--run-dir", r, "--model", "student", "--num-samples", 4, "--out", tmp_path / "s")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", PIPELINE_SNIPPET, str(r / "dmd" / "pipeline"), str(K), str(tmp_path / "p.npy")],
                   cwd=tmp_path, env=dict(env, HF_HUB_OFFLINE="1"), check=True, capture_output=True)
    ours = np.load(tmp_path / "s" / "samples.npz")["images"] / 255.0
    theirs = np.load(tmp_path / "p.npy")
    assert ours.shape == theirs.shape == (4, 48, 48, 3)
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


def export_student(teacher, folder):
    """The one-step teacher exported as distill.py exports a student: dmd/student/ and dmd/pipeline/ with its card."""
    backbone, scheduler, _, _ = load_teacher(str(teacher))
    T = scheduler.config.num_train_timesteps
    save_student(backbone, scheduler, str(folder / "student"), [T - 1])
    config = dict(generator_timesteps=[T - 1], num_classes=class_labels_of(backbone)[0], reg_weight=0, T=T,
                  teacher=str(teacher), teacher_hash=weights_hash(str(teacher)), dataset="tiny",
                  prediction_type=scheduler.config.prediction_type)
    save_pipeline(backbone, scheduler, str(folder / "pipeline"), [T - 1], config)
    return folder


CARD_RUNNER = """
import importlib.util, sys
import numpy as np, torch
assert importlib.util.find_spec("contextunet") is None  # the repository is not importable here
exec(open("card.py").read())  # the model card's own snippet
np.save("card.npy", np.stack([np.asarray(image) for image in images]))
seen = []  # the labels the UNet is asked for when the caller gives none
pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
torch.manual_seed(0)
pipe(batch_size=200, num_inference_steps=1)
np.save("drawn.npy", torch.cat(seen).numpy())
ours = [m for m in ("models", "checkpoints", "contextunet", "dmd", "sampling", "cli", "files") if m in sys.modules]
assert not ours, ours
"""


def test_mnist_student_pipeline_loads_anywhere_with_diffusers_alone(mnist_run, tmp_path):
    """The ContextUnet student's pipeline, copied to another folder, loads and samples in a fresh process started
    elsewhere with a PYTHONPATH that does not hold the repository, by the code its model card gives
    (trust_remote_code=True: the UNet's code travels in unet/), and makes sample.py's images within 1/255; called
    without class labels it draws the 10 digits, never guidance's null label."""
    run_dir = export_student(mnist_run / "teacher", tmp_path / "dmd")
    run("sample.py", "--model", "student", "--student", run_dir / "student", "--run-dir", tmp_path, "--num-samples", 8,
        "--out", tmp_path / "s")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_dir / "pipeline", elsewhere / "moved")
    card = (elsewhere / "moved" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "trust_remote_code=True" in card
    snippet = card.split("```python\n")[1].split("```")[0].replace("PATH/TO/THIS/FOLDER", str(elsewhere / "moved"))
    (elsewhere / "card.py").write_text(snippet)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", CARD_RUNNER], cwd=elsewhere, capture_output=True, text=True,
                       env=dict(env, PYTHONPATH=str(tmp_path), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ours = np.load(tmp_path / "s" / "samples.npz")["images"][..., 0].astype(int)
    theirs = np.load(elsewhere / "card.npy").astype(int)
    assert ours.shape == theirs.shape == (8, 28, 28) and np.abs(ours - theirs).max() <= 1  # uint8: 1/255
    assert sorted(set(np.load(elsewhere / "drawn.npy").tolist())) == list(range(10))


def test_pipeline_without_class_labels_draws_real_classes_only(tmp_path):
    """A UNet2DModel student whose teacher has guidance's null class (its last embedding): the pipeline called
    without class labels asks its UNet for real classes only."""
    folder = export_student(custom_teacher(tmp_path / "teacher"), tmp_path / "dmd") / "pipeline"
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    seen = []
    pipe.unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True)
    torch.manual_seed(0)
    pipe(batch_size=64, num_inference_steps=1, output_type="np")
    assert sorted(torch.cat(seen).unique().tolist()) == [0, 1]


def test_hub_id_without_network_fails_at_once(tmp_path, monkeypatch):
    """No network and no HF_HUB_OFFLINE (a hub endpoint that refuses connections, an empty cache): one line at once,
    not the download's ~25 s of retries."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    t0 = time.time()
    with pytest.raises(UserError, match="hub id 'google/ddpm-cifar10-32' cannot be fetched without network"):
        load_teacher("google/ddpm-cifar10-32")
    assert time.time() - t0 < 5


def test_bf16_keeps_the_amplified_x0_path_in_float32():
    """A CIFAR-10-architecture ε-teacher (random weights): its one-step x̂0 at t = T-1 multiplies ε̂'s error by ~157.
    Under bf16 autocast the one-step output stays within one uint8 level of float32's; the plain bf16 forward
    does not."""
    torch.manual_seed(0)
    backbone, scheduler = make_teacher("cifar10", "epsilon")
    den = Denoiser(backbone.eval(), scheduler)
    z, T = torch.randn(2, 3, 32, 32), den.T
    with torch.no_grad():
        exact = one_step(den, z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = den.to_x0(z, T - 1, den(z, T - 1))  # the raw output in bf16, then x̂0
        # the generator's path, as distill.py runs it: accelerate's prepare() wraps forward in autocast (and casts
        # the output to float32); x̂0 must still be asked for in float32 where it amplifies
        den.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(den.forward))
        kept = one_step(den, z)
    level = 2 / 255  # one uint8 level on the [-1, 1] scale
    rms = lambda x: (x.float() - exact).pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(kept) < level < rms(plain), (rms(kept), rms(plain))
