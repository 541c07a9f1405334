"""CelebA and CIFAR-10 end to end on tiny synthetic images: teacher -> pairs -> distill -> evaluate."""
import json

import pytest
from conftest import TINY_UNET, fake_images, read_json, run


@pytest.mark.parametrize("dataset", ["celeba", "cifar10"])
def test_tiny_end_to_end(tmp_path, dataset):
    data, r = fake_images(tmp_path / "data", n=16, size=40), tmp_path / "run"
    common = ["--dataset", dataset, "--run-dir", r]
    run("train_teacher.py", *common, "--data-dir", data, "--max-steps", 2, "--batch-size", 4, "--sampling-steps", 2,
        "--unet-config", json.dumps(TINY_UNET), "--prediction-type", "v_prediction")
    run("precompute.py", *common, "--num-pairs", 8, "--sampling-steps", 2)
    assert read_json(r / "pairs" / "meta.json")["guidance"] == 1.0  # unconditional: no guidance
    run("distill.py", *common, "--steps", 2, "--batch-size", 4, "--reg-loss", "pseudo_huber", "--probe-every", 0)
    run("evaluate.py", *common, "--fid", "--data-dir", data, "--num-samples", 8, "--batch-size", 4,
        "--classifier-epochs", 1, "--extend-rows", 0)  # the grid alone
    report = read_json(r / "eval" / "report.json")
    assert [row["model"] for row in report["rows"]] == ["real", "teacher-ddim-2", "teacher-ddim-4", "teacher-ddim-8",
                                                        "onestep-before", "student"]  # unconditional: one guidance, 1
    assert all(row["class_accuracy"] is None for row in report["rows"])  # no classes: skipped cleanly
    assert read_json(r / "classifier" / "config.json")["task"] == "rotation"  # self-supervised features
