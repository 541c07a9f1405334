import json

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
