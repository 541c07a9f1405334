import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_UNET, fake_images, fake_mnist, read_json, run
from safetensors.torch import load_file

import train_teacher
from checkpoints import load_teacher
from cli import parse, script_parser
from recipes import PRESETS, dataset_name


def teacher_args(tmp_path, dataset):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if dataset in ("mnist", "fashion-mnist"):
        fake_mnist(data_dir, n=16)
        return ["--n-feat", 8]
    fake_images(data_dir, n=8)
    return ["--unet-config", json.dumps(TINY_UNET)]


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "celeba", "cifar10"])
def test_two_step_training_writes_a_loadable_teacher(tmp_path, dataset):
    extra = teacher_args(tmp_path, dataset)
    run("train_teacher.py", "--dataset", dataset, "--run-dir", tmp_path / "run", "--data-dir", tmp_path / "data",
        "--max-steps", 2, "--batch-size", 4, "--sampling-steps", 2, *extra)
    out = tmp_path / "run" / "teacher"
    for f in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "train_config.json", "samples.png"):
        assert (out / f).is_file(), f
    cfg = read_json(out / "train_config.json")
    assert cfg["steps_done"] == 2 and cfg["dataset"] == dataset
    # loadable: the loader every other script uses gives back the trained weights (the last checkpoint's) and schedule
    backbone, scheduler, _, _ = load_teacher(str(out))
    trained = torch.load(out / "train_state.pt", weights_only=True)["model"]
    loaded = backbone.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in loaded)
    assert scheduler.config.num_train_timesteps == (PRESETS[dataset]["T"] or 1000)
    # a finished teacher is not overwritten by accident
    r = run("train_teacher.py", "--dataset", dataset, "--run-dir", tmp_path / "run", "--data-dir", tmp_path / "data",
            "--max-steps", 2, *extra, check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr
    if dataset == "fashion-mnist":  # the teacher runs as its preset, and the sample grid's columns are named
        r = run("sample.py", "--teacher", out, "--run-dir", tmp_path / "run", "--num-samples", 10, "--sampling-steps", 2)
        assert "running as --dataset fashion-mnist" in r.stderr and "columns: T-shirt/top, Trouser, Pullover" in r.stdout


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


def test_without_label_dropout_a_custom_teacher_has_no_null_class(tmp_path):
    """--label-dropout 0 never trains the null class: it is not registered, so guidance cannot use it untrained."""
    for name in ("a", "b"):
        fake_images(tmp_path / "data" / name, n=2, size=8)
    r = tmp_path / "run"
    run("train_teacher.py", "--data-dir", tmp_path / "data", "--image-size", 8, "--label-dropout", 0, "--run-dir", r,
        "--max-steps", 1, "--batch-size", 4, "--sampling-steps", 1, "--unet-config", json.dumps(TINY_UNET))
    cfg = read_json(r / "teacher" / "config.json")
    assert cfg["num_class_embeds"] == 2 and "_null_class_label" not in cfg
    assert read_json(r / "teacher" / "train_config.json")["guidance"] == 1.0


def test_a_teacher_made_for_a_preset_runs_as_that_preset(tmp_path, monkeypatch, capsys):
    """--teacher without --dataset: a folder train_teacher.py wrote for a preset (train_config.json) or a preset's hub
    id runs as that preset, and says so; any other teacher is your own ("custom")."""
    (tmp_path / "train_config.json").write_text(json.dumps({"dataset": "mnist"}))
    p = script_parser("test")
    p.add_argument("--teacher")
    monkeypatch.setattr(sys, "argv", ["test", "--teacher", str(tmp_path)])
    args = parse(p)
    assert (args.dataset, args.run_dir) == ("mnist", os.path.join("runs", "mnist"))
    assert "was made for the mnist preset" in capsys.readouterr().err
    assert dataset_name(None, "google/ddpm-cifar10-32") == "cifar10"
    assert dataset_name(None, str(tmp_path / "elsewhere")) == "custom"


def test_label_dropout_feeds_the_null_label_to_the_teacher(tmp_path, monkeypatch):
    """Guidance needs an unconditional model: with --label-dropout 0.5 the backbone is trained on some labels replaced
    by the null label (10 for MNIST's ContextUnet) and on the others' real labels. Run in-process, with a hook on the
    backbone recording the labels of the forwards that train it (the sample grid's run without gradients)."""
    fake_mnist(tmp_path, n=16)
    seen, make_teacher = [], train_teacher.make_teacher

    def recorded_teacher(*args, **kwargs):
        backbone, scheduler = make_teacher(*args, **kwargs)
        backbone.register_forward_pre_hook(
            lambda module, a, kw: seen.append(kw["class_labels"]) if torch.is_grad_enabled() else None, with_kwargs=True)
        return backbone, scheduler
    monkeypatch.setattr(train_teacher, "make_teacher", recorded_teacher)
    monkeypatch.setattr(sys, "argv", ["train_teacher.py", "--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path),
                                      "--n-feat", "8", "--batch-size", "8", "--max-steps", "2", "--sampling-steps", "1",
                                      "--label-dropout", "0.5"])
    train_teacher.main()
    labels = torch.cat(seen)
    assert len(labels) == 16  # two training steps of 8
    assert 0 < (labels == 10).sum() < 16 and set(labels[labels != 10].tolist()) <= set(range(10))


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


def test_flow_matching_teacher_with_sd3s_time_sampling(tmp_path):
    """--schedule flow saves a FlowMatchEulerDiscreteScheduler (its shift) that every script reads as flow matching,
    and the ContextUnet is trained on the velocity target at logit-normal timesteps."""
    fake_mnist(tmp_path, n=16)
    run("train_teacher.py", "--data-dir", tmp_path, "--run-dir", tmp_path / "run", "--n-feat", 8, "--max-steps", 2,
        "--batch-size", 4, "--sampling-steps", 2, "--schedule", "flow", "--shift", 2, "--time-sampling", "logit-normal")
    sched = read_json(tmp_path / "run" / "teacher" / "scheduler_config.json")
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 2
    assert read_json(tmp_path / "run" / "teacher" / "train_config.json")["prediction_type"] == "flow"


def test_logit_normal_timesteps_are_sd3s():
    """SD3's training draws u = sigmoid(n), n ~ N(mean, std), and takes the scheduler's timesteps[floor(u T)], whose
    first entries are the noisiest: t = T - 1 - floor(u T) on this project's grid. At mean 0 the draws gather in the
    middle of the schedule (the middle half holds P(|n| < ln 3) = 73% of them against uniform's 50%); a positive mean moves them
    toward low noise, as in SD3."""
    args = lambda mean: type("A", (), dict(time_sampling="logit-normal", logit_mean=mean, logit_std=1.0))  # noqa: E731
    t = train_teacher.training_timesteps(args(0.0), 100000, 1000, torch.Generator().manual_seed(0)).float()
    assert t.min() >= 0 and t.max() <= 999 and abs(t.mean().item() - 499.5) < 5
    assert 0.72 < ((t >= 250) & (t < 750)).float().mean().item() < 0.74
    low_noise = train_teacher.training_timesteps(args(1.0), 100000, 1000, torch.Generator().manual_seed(0)).float()
    assert low_noise.mean() < 0.4 * 1000
    uniform = type("A", (), dict(time_sampling="uniform"))
    u = train_teacher.training_timesteps(uniform, 100000, 1000, torch.Generator().manual_seed(0)).float()
    assert 0.49 < ((u >= 250) & (u < 750)).float().mean().item() < 0.51
