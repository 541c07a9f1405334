import json

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, fake_images, fake_mnist, read_json, run
from safetensors.torch import load_file


def teacher_args(tmp_path, dataset):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if dataset == "mnist":
        fake_mnist(data_dir, n=16)
        return ["--n-feat", 8]
    fake_images(data_dir, n=8)
    return ["--unet-config", json.dumps(TINY_UNET)]


@pytest.mark.parametrize("dataset", ["mnist", "celeba", "cifar10"])
def test_two_step_training_writes_a_loadable_teacher(tmp_path, dataset):
    extra = teacher_args(tmp_path, dataset)
    run("train_teacher.py", "--dataset", dataset, "--run-dir", tmp_path / "run", "--data-dir", tmp_path / "data",
        "--max-steps", 2, "--batch-size", 4, "--sampling-steps", 2, *extra)
    out = tmp_path / "run" / "teacher"
    for f in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "train_config.json", "samples.png"):
        assert (out / f).is_file(), f
    cfg = read_json(out / "train_config.json")
    assert cfg["steps_done"] == 2 and cfg["dataset"] == dataset
    # a finished teacher is not overwritten by accident
    r = run("train_teacher.py", "--dataset", dataset, "--run-dir", tmp_path / "run", "--data-dir", tmp_path / "data",
            "--max-steps", 2, *extra, check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_trains_a_class_conditional_unet_on_your_own_images(tmp_path):
    """No --dataset: your images in class subfolders, any size and channel count; label dropout gives the null class,
    recorded in the UNet's config, so the teacher can be guided."""
    for name in ("a", "b", "c"):
        fake_images(tmp_path / "data" / name, n=4, size=20)
    r = tmp_path / "run"
    run("train_teacher.py", "--data-dir", tmp_path / "data", "--image-size", 16, "--channels", 1, "--run-dir", r,
        "--max-steps", 2, "--batch-size", 4, "--sampling-steps", 2, "--unet-config", json.dumps(TINY_UNET))
    cfg = read_json(r / "teacher" / "config.json")
    assert (cfg["num_class_embeds"], cfg["_null_class_label"], cfg["in_channels"], cfg["sample_size"]) == (4, 3, 1, 16)
    assert read_json(r / "teacher" / "train_config.json")["classes"] == ["a", "b", "c"]
    run("sample.py", "--teacher", r / "teacher", "--run-dir", r, "--guidance", 3, "--num-samples", 6, "--sampling-steps", 2,
        "--out", r / "s")
    assert np.load(r / "s" / "samples.npz")["images"].shape == (6, 16, 16, 1)


def test_resume_reaches_the_same_weights(tmp_path):
    extra = teacher_args(tmp_path, "mnist")
    common = ["--run-dir", tmp_path / "a", "--data-dir", tmp_path / "data", "--batch-size", 4, "--sampling-steps", 1,
              "--ema", 0.9, "--ckpt-every", 2, *extra]
    run("train_teacher.py", *common, "--max-steps", 6)
    straight = load_file(tmp_path / "a" / "teacher" / "diffusion_pytorch_model.safetensors")
    common[1] = tmp_path / "b"
    run("train_teacher.py", *common, "--max-steps", 6, "--max-minutes", 1e-9)  # stops after its first step's checkpoint
    assert torch.load(tmp_path / "b" / "teacher" / "train_state.pt", weights_only=True)["step"] == 1
    run("train_teacher.py", *common, "--max-steps", 6, "--resume")
    resumed = load_file(tmp_path / "b" / "teacher" / "diffusion_pytorch_model.safetensors")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
