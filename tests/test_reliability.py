"""Interruption (kill -9 of a real process), bad input (one line, exit 2, nothing written), numerical faults,
and safe loading."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import ROOT, TINY_UNET, fake_images, fake_mnist, run, tiny_teacher
from diffusers import AutoencoderKL, CMStochasticIterativeScheduler, DDPMScheduler, UNet2DModel
from test_custom import custom_teacher
from safetensors.torch import load_file

from checkpoints import save_teacher
from models import make_teacher


def kill_when(script, args, path, extra_wait=0.0):
    """Start a script, kill -9 it as soon as `path` exists (plus extra_wait seconds), return when it is dead. Fails
    unless `path` appeared and the kill is what ended the script (exit status -9): a script that crashed, or finished
    before the kill, proves nothing about resuming."""
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=err,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
        deadline = time.time() + 300
        while not os.path.exists(path) and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(extra_wait)
        p.kill()
        p.wait()
        err.seek(0)
        assert os.path.exists(path) and p.returncode == -9, (f"{script} ended with status {p.returncode} before or "
                                                             f"without the kill:\n{err.read()[-2000:]}")
    return p.returncode


def same_safetensors(a, b):
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_train_teacher_survives_kill(tmp_path):
    fake_mnist(tmp_path, n=16)
    args = ["--data-dir", tmp_path, "--n-feat", 8, "--batch-size", 4, "--max-steps", 60, "--ckpt-every", 2,
            "--sampling-steps", 1]
    run("train_teacher.py", "--run-dir", tmp_path / "a", *args)
    state = tmp_path / "b" / "teacher" / "train_state.pt"
    kill_when("train_teacher.py", ["--run-dir", tmp_path / "b", *args], state)
    assert torch.load(state, weights_only=True)["step"] < 60  # really interrupted, and the state is readable
    run("train_teacher.py", "--run-dir", tmp_path / "b", *args, "--resume")
    assert same_safetensors(tmp_path / "a" / "teacher" / "diffusion_pytorch_model.safetensors",
                            tmp_path / "b" / "teacher" / "diffusion_pytorch_model.safetensors")


def test_precompute_survives_kill(tmp_path):
    args = ["--num-pairs", 30, "--shard-size", 3, "--sampling-steps", 3, "--batch-size", 2]  # 10 shards: the kill
    # at the first lands long before the last
    for name in ("a", "b"):
        tiny_teacher(tmp_path / name / "teacher", "mnist", "v_prediction")
    run("precompute.py", "--run-dir", tmp_path / "a", *args)
    kill_when("precompute.py", ["--run-dir", tmp_path / "b", *args], tmp_path / "b" / "pairs" / "shard_00000.safetensors")
    assert not (tmp_path / "b" / "pairs" / "shard_00009.safetensors").exists()  # really interrupted
    run("precompute.py", "--run-dir", tmp_path / "b", *args)
    for k in range(10):
        name = f"shard_{k:05d}.safetensors"
        assert same_safetensors(tmp_path / "a" / "pairs" / name, tmp_path / "b" / "pairs" / name), name


def test_distill_survives_kill(mnist_run, tmp_path):
    """With DMD2's GAN head on (its weights, optimiser state and real-image draws must all resume exactly)."""
    args = ["--steps", 12, "--ckpt-every", 2, "--batch-size", 4, "--reg-loss", "pseudo_huber", "--lr", 1e-4,
            "--probe-every", 0, "--sample-every", 100, "--gan-weight", 1e-2, "--gen-every", 2]
    for name in ("a", "b"):
        shutil.copytree(mnist_run / "teacher", tmp_path / name / "teacher")
        shutil.copytree(mnist_run / "pairs", tmp_path / name / "pairs")
    run("distill.py", "--run-dir", tmp_path / "a", *args)
    state = tmp_path / "b" / "dmd" / "train_state.pt"
    kill_when("distill.py", ["--run-dir", tmp_path / "b", *args], state, extra_wait=0.2)
    assert not (tmp_path / "b" / "dmd" / "summary.json").exists()
    run("distill.py", "--run-dir", tmp_path / "b", *args, "--resume")
    assert same_safetensors(tmp_path / "a" / "dmd" / "student" / "diffusion_pytorch_model.safetensors",
                            tmp_path / "b" / "dmd" / "student" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def bad_input_env(tmp_path_factory, mnist_run):
    """A finished MNIST run (teacher, pairs, dmd) plus broken variants, for the bad-input table."""
    root = tmp_path_factory.mktemp("bad")
    good = root / "good"
    shutil.copytree(mnist_run / "teacher", good / "teacher")
    shutil.copytree(mnist_run / "pairs", good / "pairs")
    run("distill.py", "--run-dir", good, "--steps", 1, "--batch-size", 4, "--reg-loss", "pseudo_huber", "--probe-every", 0)
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    w = truncated / "teacher" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    shard = truncated / "pairs" / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:500])
    other = root / "other"
    shutil.copytree(good, other)
    tiny_teacher(other / "teacher", "mnist", "v_prediction", seed=9)
    shutil.rmtree(other / "dmd")
    (root / "empty_teacher").mkdir()
    custom_teacher(root / "no_null", null_class=False)  # a class-conditional UNet2DModel without a null class
    (root / "no_unet").mkdir()
    (root / "no_unet" / "model_index.json").write_text("{}")  # a pipeline folder without unet/
    for name in ("a", "b", "c"):
        fake_images(root / "three_classes" / name, n=2)
    torch.manual_seed(0)  # teachers of the newer kinds, each wrong in one way
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(8, 16), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    save_teacher(UNet2DModel(sample_size=8, in_channels=4, out_channels=4, **TINY_UNET), DDPMScheduler(),
                 str(root / "latent_mismatch"), vae)  # 3-channel latents for a 4-channel denoiser
    save_teacher(*make_teacher("custom", shape=(4, 8, 8), backbone="dit", unet={"num_layers": 1, "attention_head_dim": 8}),
                 str(root / "one_class_dit"))  # an unconditional DiT: one class, no null label
    save_teacher(UNet2DModel(sample_size=8, in_channels=3, out_channels=3, **TINY_UNET), CMStochasticIterativeScheduler(),
                 str(root / "consistency"))  # a scheduler whose noise schedule is neither family
    return root


BAD_FRESH_PROCESS = [  # (script, args, words the one-line message must contain), each run as `python script args`
    ("train_teacher.py", ["--dataset", "imagenet"], "invalid choice"),
    ("precompute.py", ["--dataset", "cifar10", "--run-dir", "{root}/x"], "cannot be fetched without network"),
    ("distill.py", ["--run-dir", "{root}/other", "--probe-every", 0], "another teacher"),
]
BAD = [  # the same, each run in this process (main() under cli.run, as the script's last line runs it)
    ("precompute.py", ["--teacher", "{root}/nowhere"], "neither a folder nor a hub id"),
    ("precompute.py", ["--teacher", "{root}/empty_teacher", "--run-dir", "{root}/x"], "has no diffusion_pytorch_model"),
    ("precompute.py", ["--run-dir", "{root}/truncated"], "could not be loaded"),
    ("distill.py", ["--run-dir", "{root}/good", "--guidance", 4, "--overwrite"], "guidance"),
    ("distill.py", ["--run-dir", "{root}/good", "--pairs", "{root}/truncated/pairs", "--overwrite"], "truncated"),
    ("distill.py", ["--run-dir", "{root}/good", "--lr", 0], "--lr: 0 must be > 0"),
    ("distill.py", ["--run-dir", "{root}/good", "--lr", "fast"], "'fast' is not a float"),
    ("distill.py", ["--run-dir", "{root}/good", "--batch-size", 0], "--batch-size: 0 must be > 0"),
    ("precompute.py", ["--run-dir", "{root}/good", "--num-pairs", 0], "--num-pairs: 0 must be > 0"),
    ("precompute.py", ["--dataset", "celeba", "--teacher", "{root}/good/teacher", "--guidance", -1], "must be >= 0"),
    ("precompute.py", ["--dataset", "celeba", "--teacher", "{root}/good/teacher", "--guidance", 2], "unconditional"),
    ("precompute.py", ["--dataset", "cifar10", "--teacher", "{root}/good/teacher", "--run-dir", "{root}/x"], "makes 1x28x28 images"),
    ("distill.py", ["--run-dir", "{root}/good"], "--overwrite"),
    ("train_teacher.py", ["--run-dir", "{root}/good/..", "--data-dir", "{root}/nowhere"], "does not exist"),
    ("evaluate.py", ["--fid", "--run-dir", "{root}/good", "--seed", 0], "overlap the pairs' seeds 0..47"),
    ("distill.py", ["--run-dir", "{root}/good", "--backward-simulation", "--overwrite"], "needs a K-step generator"),
    ("precompute.py", ["--run-dir", "{root}/good", "--generator-steps", 4], "[299, 199, 99] are not all among DDIM-25's: pass"),
    ("precompute.py", ["--run-dir", "{root}/good", "--generator-steps", 3], "does not divide the teacher's 400"),
    ("distill.py", ["--run-dir", "{root}/good", "--generator-steps", 4, "--reg-step-inputs", "teacher", "--dm-weight", 0,
                    "--overwrite"], "needs the teacher's states at timesteps [299, 199, 99] with the pairs; "),
    ("distill.py", ["--run-dir", "{root}/good", "--reg-step-inputs", "teacher", "--overwrite"], "needs --generator-steps K > 1"),
    ("distill.py", ["--run-dir", "{root}/good", "--guidance-t-max", 0.01, "--overwrite"], "--guidance-t-max 0.01: a fraction of T above --t-min"),
    ("distill.py", ["--run-dir", "{root}/good", "--guidance-t-max", 0.8, "--overwrite"], "were guided at t <= 1 x T, µreal would be at t <= 0.8 x T"),
    ("precompute.py", ["--run-dir", "{root}/good", "--guidance-t-max", 1.5], "--guidance-t-max 1.5: a fraction of T, at most 1"),
    ("distill.py", ["--run-dir", "{root}/good", "--generator-steps", 3, "--batch-size", 4, "--overwrite"], "does not divide the teacher's 400"),
    ("distill.py", ["--run-dir", "{root}/good", "--gan-weight", 1e-2, "--batch-size", 4, "--resume", "--steps", 2], "it was made with False"),
    ("precompute.py", ["--teacher", "{root}/no_null", "--guidance", 2, "--run-dir", "{root}/x"], "has none: drop --guidance"),
    ("precompute.py", ["--teacher", "{root}/no_unet", "--run-dir", "{root}/x"], "has no unet/"),
    ("distill.py", ["--teacher", "{root}/no_null", "--data-dir", "{root}/three_classes", "--reg-weight", 0, "--gan-weight", 1e-2,
                    "--run-dir", "{root}/x"], "3 class subfolders but the teacher makes 2 classes"),
    ("evaluate.py", ["--fid", "--dataset", "mnist", "--teacher", "{root}/no_null", "--run-dir", "{root}/x"],
     "makes 3x48x48 images but mnist is 1x28x28"),
    ("train_teacher.py", ["--dataset", "mnist", "--image-size", 7, "--run-dir", "{root}/x"], "are for your own images"),
    ("distill.py", ["--run-dir", "{root}/good", "--divergence", "js", "--overwrite"], "--gan-weight 0 has no head"),
    ("distill.py", ["--run-dir", "{root}/good", "--out", "teacher", "--overwrite"], "a plain folder name other than teacher"),
    ("distill.py", ["--run-dir", "{root}/good", "--dm-weight", 0, "--reg-weight", 0], "nothing trains netG"),
    ("distill.py", ["--run-dir", "{root}/good", "--guidance", "best", "--reg-weight", 0], "--guidance best needs"),
    ("precompute.py", ["--run-dir", "{root}/good", "--best-row", "--guidance", 2], "--best-row takes"),
    ("evaluate.py", ["--fid", "--teacher", "{root}/no_null", "--guidance", 2, "--run-dir", "{root}/x"],
     "has none: drop --guidance"),
    ("precompute.py", ["--teacher", "{root}/latent_mismatch", "--run-dir", "{root}/x"],
     "its vae/ makes latents of 3 channels but the denoiser takes 4"),
    ("train_teacher.py", ["--schedule", "flow", "--prediction-type", "epsilon", "--run-dir", "{root}/x"],
     "a flow-matching teacher (--schedule flow) predicts the velocity"),
    ("precompute.py", ["--teacher", "{root}/one_class_dit", "--guidance", 2, "--run-dir", "{root}/x"],
     "has none: drop --guidance"),
    ("precompute.py", ["--teacher", "{root}/consistency", "--run-dir", "{root}/x"],
     "CMStochasticIterativeScheduler, whose noise schedule this project does not know"),
    ("train_teacher.py", ["--vae", "{root}/nowhere", "--run-dir", "{root}/x"], "could not be loaded as an AutoencoderKL"),
    ("train_vae.py", ["--dataset", "mnist", "--image-size", 16, "--run-dir", "{root}/x"], "are for your own images"),
]


def test_bad_input_table(bad_input_env):
    root = bad_input_env
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    def case(c, runner):
        script, args, words = c
        return c, runner(script, *[str(a).format(root=root) for a in args])
    with ThreadPoolExecutor(2) as pool:
        fresh = list(pool.map(lambda c: case(c, lambda *a: run(*a, check=False, fresh=True)), BAD_FRESH_PROCESS))
    results = fresh + [case(c, lambda *a: run(*a, check=False, limit=60)) for c in BAD]
    for (script, args, words), r in results:
        lines = [l for l in r.stderr.splitlines() if l.strip() and "Warning" not in l and "warnings.warn" not in l]
        assert r.returncode == 2, (script, args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (script, args, r.stderr[-2000:])
        assert lines and lines[-1].startswith("error: ") and words in lines[-1], (script, args, lines[-3:])
        print(f"| {script} {' '.join(map(str, args))} | {lines[-1]} |")  # the table for humans (pytest -s)
    after = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert after == before  # nothing written or overwritten
    assert not (root / "x").exists()


def test_nan_stops_the_run_naming_step_and_loss(mnist_run, tmp_path):
    shutil.copytree(mnist_run / "teacher", tmp_path / "teacher")
    shutil.copytree(mnist_run / "pairs", tmp_path / "pairs")
    r = run("distill.py", "--run-dir", tmp_path, "--steps", 20, "--batch-size", 4, "--lr", 1e30, "--ckpt-every", 1,
            "--reg-loss", "pseudo_huber", "--probe-every", 0, check=False)
    assert r.returncode == 2 and "at step" in r.stderr and "last good checkpoint" in r.stderr
    step = int(r.stderr.split("at step ")[1].split(":")[0])
    assert torch.load(tmp_path / "dmd" / "train_state.pt", weights_only=True)["step"] == step  # the last good one


class Evil:
    def __reduce__(self):
        return (print, ("this code ran while loading",))


def test_pickled_checkpoint_is_refused(mnist_run, tmp_path):
    shutil.copytree(mnist_run / "teacher", tmp_path / "teacher")
    shutil.copytree(mnist_run / "pairs", tmp_path / "pairs")
    (tmp_path / "dmd").mkdir()
    torch.save({"step": 1, "payload": Evil()}, tmp_path / "dmd" / "train_state.pt")
    r = run("distill.py", "--run-dir", tmp_path, "--resume", "--steps", 2, "--batch-size", 4, "--probe-every", 0,
            check=False)
    assert r.returncode == 2 and "pickled objects" in r.stderr and "this code ran" not in r.stdout + r.stderr
