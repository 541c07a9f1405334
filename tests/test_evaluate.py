import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from conftest import read_json, run
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

import evaluate
import metrics
from models import Classifier


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clf") / "classifier"
    torch.manual_seed(0)
    Classifier(in_channels=1, num_outputs=10).save_pretrained(folder)
    return str(folder)


def test_classifier_extractor_is_registered_and_shaped(classifier_dir):
    metrics.register_classifier_features()
    assert "dmd-classifier" in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    fe = torch_fidelity.utils.create_feature_extractor("dmd-classifier", ["penultimate", "logits"], cuda=False,
                                                       verbose=False, feature_extractor_weights_path=classifier_dir)
    f, logits = fe(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8))
    assert f.shape == (5, 128) and logits.shape == (5, 10)


def test_fid_of_a_set_against_itself_is_zero(classifier_dir):
    images = torch.rand(200, 1, 28, 28) * 2 - 1
    extractor = dict(feature_extractor="dmd-classifier", feature_layer_fid="penultimate",
                     feature_extractor_weights_path=classifier_dir, rgb=False, label="")

    class Args:
        device = "cpu"
    metrics.register_classifier_features()
    same, other = evaluate.fid(images, images, extractor, Args), evaluate.fid(images, -images.abs(), extractor, Args)
    assert other > 0 and abs(same) < 1e-3 * other


def test_fid_matches_closed_form_on_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (4000, 8))
    b = rng.normal(0.5, 1, (4000, 8)) @ rng.normal(0, 0.6, (8, 8))
    got = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(a)),
                                   fid_features_to_statistics(torch.from_numpy(b)), False)["frechet_inception_distance"]
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert abs(got - expected) / expected < 1e-3


def test_tiny_end_to_end_report(mnist_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(mnist_run / "teacher", d / "teacher")
    shutil.copytree(mnist_run / "pairs", d / "pairs")
    shutil.copytree(mnist_run / "teacher", d / "dmd" / "student")  # a student is a teacher-format folder
    r = run("evaluate.py", "--fid", "--run-dir", d, "--num-samples", 20, "--batch-size", 10, "--classifier-epochs", 1,
            "--num-reference", 100)
    report = read_json(d / "eval" / "report.json")
    assert report["dataset"] == "mnist" and report["num_samples"] == 20
    assert report["feature_extractor"].startswith("classifier")  # no Inception weights offline
    assert [row["model"] for row in report["rows"]] == ["teacher-ddim-3", "onestep-before", "student"]
    for row in report["rows"]:
        assert set(row) >= {"model", "nfe", "fid", "class_accuracy", "ms_per_image"}
        assert np.isfinite(row["fid"]) and 0 <= row["class_accuracy"] <= 1 and row["ms_per_image"] > 0
    assert report["rows"][0]["nfe"] == 6 and report["rows"][1]["nfe"] == 1  # 3 guided DDIM steps = 6 evaluations
    student, before = report["rows"][2], report["rows"][1]
    assert student["fid"] == pytest.approx(before["fid"])  # same weights, same seeds -> same images
    assert (d / "eval" / "report.md").is_file() and (d / "eval" / "grid.png").is_file()
    assert "| student | 1 |" in r.stdout


def test_classifier_is_the_same_on_every_run(tmp_path):
    """Its weights (so the feature space, so the FID scale) depend only on the data and --seed, never on the run."""
    data = torch.utils.data.TensorDataset(torch.rand(256, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (256,)))

    torch.rand(7)  # whatever the global generator's state before
    a = metrics.train_classifier(data, data, str(tmp_path / "a"), num_classes=10, seed=0, epochs=1).state_dict()
    b = metrics.train_classifier(data, data, str(tmp_path / "b"), num_classes=10, seed=0, epochs=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
