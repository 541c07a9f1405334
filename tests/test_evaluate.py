import argparse
import json
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from torch_fidelity.metric_prc import prc_features_to_metric
from conftest import read_json, run

import evaluate
import metrics
from cli import UserError
from metrics import Classifier
from sampling import PROBE_SEED


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
    """Through the whole path evaluate.py uses: images -> torch-fidelity extractor (the classifier) -> scores."""
    images = torch.rand(200, 1, 28, 28) * 2 - 1
    fe, layer, label, rgb = metrics.feature_extractor("classifier", classifier_dir)
    f = metrics.extract(fe, layer, images, rgb)
    same, other = metrics.scores(f, f)["fid"], metrics.scores(metrics.extract(fe, layer, -images.abs(), rgb), f)["fid"]
    assert other > 0 and abs(same) < 1e-3 * other and label.startswith("classifier")


def test_fid_matches_closed_form_on_gaussians():
    """metrics.scores' FID (what every report prints) is the Fréchet distance of the two feature sets' Gaussians,
    ||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½), written out here with numpy and scipy."""
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (300, 8))  # few samples: scores() also computes KID and precision/recall on them
    b = rng.normal(0.5, 1, (300, 8)) @ rng.normal(0, 0.6, (8, 8))
    got = metrics.scores(torch.from_numpy(a).float(), torch.from_numpy(b).float())["fid"]
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert abs(got - expected) / expected < 1e-3


def test_tiny_end_to_end_report(mnist_run, tmp_path):
    """The report of a tiny run: every row with every metric, on seeds held out from the pairs' and the probe's, and a
    student_best chosen by distill.py's probe."""
    d = tmp_path / "run"
    shutil.copytree(mnist_run / "teacher", d / "teacher")
    shutil.copytree(mnist_run / "pairs", d / "pairs")
    run("evaluate.py", "--prepare", "--run-dir", d, "--classifier-epochs", 1)
    run("distill.py", "--run-dir", d, "--steps", 3, "--batch-size", 4, "--reg-loss", "pseudo_huber", "--lr", 1e-3,
        "--probe-every", 1, "--probe-samples", 20)
    stats = [json.loads(line) for line in open(d / "dmd" / "stats.jsonl")]
    best = min(stats, key=lambda row: row["probe_fid"])
    assert read_json(d / "dmd" / "student_best" / "probe.json") == dict(step=best["step"], probe_fid=best["probe_fid"],
                                                                        of="student")  # no EMA: the student itself
    r = run("evaluate.py", "--fid", "--run-dir", d, "--num-samples", 20, "--batch-size", 10, "--num-reference", 100,
            "--ddim-steps", "1", "--extend-rows", 0)  # the grid alone here: its extension is the next test's
    report = read_json(d / "eval" / "report.json")
    assert report["dataset"] == "mnist" and report["num_samples"] == 20
    assert report["feature_extractor"].startswith("classifier")  # no Inception weights offline
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["real", "teacher-g1.5-ddim-1", "teacher-g2-ddim-1", "teacher-g2-ddim-3", "teacher-g2.5-ddim-1",
                          "onestep-before", "onestep-before-guided", "student", "student-best"]  # + the pairs' DDIM-3
    assert report["guidance"] == 2.0 and report["teacher_guidance"] == [1.5, 2.0, 2.5]  # the pairs' and around it
    for name, row in rows.items():
        for key in ("fid", "kid", "kid_std", "precision", "recall"):
            assert np.isfinite(row[key]), (name, key)
        if name != "real":  # the share of the 20 samples the classifier puts in their class: a multiple of 1/20
            assert row["class_accuracy"] * 20 == pytest.approx(round(row["class_accuracy"] * 20), abs=1e-6), name
            assert row["ms_per_image"] > 0, name
    assert rows["real"]["class_accuracy"] is None  # real images have no requested class
    assert [rows[n]["nfe"] for n in ("teacher-g2-ddim-1", "teacher-g2-ddim-3", "onestep-before", "onestep-before-guided",
                                     "student")] == [2, 6, 1, 2, 1]  # guided: 2 evaluations per step
    evaluation, pairs = report["seeds"]["evaluation"], report["seeds"]["pairs"]
    assert pairs == [0, 48] and evaluation[0] >= pairs[1]  # held out: the student never saw these noises
    assert not set(range(*evaluation)) & set(range(PROBE_SEED, PROBE_SEED + 20))
    best = min((n for n in rows if n.startswith("teacher-")), key=lambda n: rows[n]["fid"])
    teacher, real = rows[best]["fid"], rows["real"]["fid"]  # the teacher's best row over steps x guidance
    assert report["gap_reference"] == best
    assert rows["student"]["gap_closed"] == pytest.approx((teacher - rows["student"]["fid"]) / (teacher - real))
    own = min((n for n in rows if n.startswith("teacher-g2-")), key=lambda n: rows[n]["fid"])
    assert report["gap_reference_own"] == own
    assert rows["student"]["gap_closed_own"] == pytest.approx((rows[own]["fid"] - rows["student"]["fid"]) / (rows[own]["fid"] - real))
    for f in ("report.md", "grid.png", "fid_vs_nfe.png"):
        assert (d / "eval" / f).is_file(), f
    assert report["reused_rows"] == []
    # evaluated again on the same setup, the rows no student changes are taken from the report, not scored again
    run("evaluate.py", "--fid", "--run-dir", d, "--num-samples", 20, "--batch-size", 10, "--num-reference", 100,
        "--ddim-steps", "1", "--extend-rows", 0)
    again = read_json(d / "eval" / "report.json")
    assert again["reused_rows"] == [n for n in rows if not n.startswith("student")]
    assert again["rows"][:-2] == report["rows"][:-2]  # the students are scored again: same numbers, new timings
    assert [r["fid"] for r in again["rows"][-2:]] == [r["fid"] for r in report["rows"][-2:]]
    # ... also in a copy of the run folder elsewhere (same teacher and classifier, by content): a seed sweep's folder
    moved = tmp_path / "elsewhere"
    shutil.copytree(d, moved, symlinks=True)
    run("evaluate.py", "--fid", "--run-dir", moved, "--num-samples", 20, "--batch-size", 10, "--num-reference", 100,
        "--ddim-steps", "1", "--rows", "real,teacher", "--extend-rows", 0)
    assert read_json(moved / "eval" / "report.json")["reused_rows"] == [n for n in rows if n.startswith(("real", "teacher"))]
    # distill.py's probe now reads its gap against the teacher's best row of that report, measured on its own scale
    run("distill.py", "--run-dir", d, "--steps", 1, "--batch-size", 4, "--reg-loss", "pseudo_huber", "--lr", 1e-3,
        "--probe-every", 1, "--probe-samples", 20, "--overwrite")
    ref = read_json(d / "dmd" / "summary.json")["gap_reference"]
    assert ref["model"] == best and ref["probe_fid"] > 0 and ref["real_probe_fid"] >= 0
    probed = json.loads((d / "dmd" / "stats.jsonl").read_text().splitlines()[-1])
    assert probed["probe_gap"] == pytest.approx((ref["probe_fid"] - probed["probe_fid"]) /
                                                (ref["probe_fid"] - ref["real_probe_fid"]))
    # ... but a row made at another guidance is scored again
    run("evaluate.py", "--fid", "--run-dir", d, "--num-samples", 20, "--batch-size", 10, "--num-reference", 100,
        "--ddim-steps", "1", "--rows", "real,onestep", "--guidance", 3, "--extend-rows", 0)
    third = read_json(d / "eval" / "report.json")
    assert third["reused_rows"] == ["real", "onestep-before"] and third["rows"][-1]["guidance"] == 3.0
    assert "| student | 1 |" in r.stdout and f"best row over steps x guidance, {best}" in r.stdout
    # a failed evaluation destroys nothing: a misspelt row is refused before any work, with one line naming the rows
    # there are, and a row that fails after others succeeded (a truncated student) writes no file either
    files = {f: (d / "eval" / f).read_bytes() for f in ("report.json", "report.md", "grid.png", "fid_vs_nfe.png")}
    bad = run("evaluate.py", "--fid", "--run-dir", d, "--num-samples", 20, "--rows", "real,studnet", check=False, limit=60)
    lines = [line for line in bad.stderr.splitlines() if line.strip() and "arning" not in line]
    assert bad.returncode == 2 and len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert lines[0].startswith("error: --rows studnet matches no row") and "student-best" in lines[0], lines
    weights = d / "dmd" / "student" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    bad = run("evaluate.py", "--fid", "--run-dir", d, "--num-samples", 20, "--batch-size", 10, "--num-reference", 100,
              "--rows", "real,student", "--rescore", check=False, limit=60)
    assert bad.returncode == 2 and "real: fid" in bad.stderr and "could not be loaded" in bad.stderr, bad.stderr[-2000:]
    assert {f: (d / "eval" / f).read_bytes() for f in files} == files and not (d / "eval.tmp").exists()
    # the metric's floor alone (no row on the NFE axis) is a report too
    run("evaluate.py", "--fid", "--run-dir", d, "--num-samples", 20, "--batch-size", 10, "--num-reference", 100, "--rows", "real")
    assert [r["model"] for r in json.loads((d / "eval" / "report.json").read_text())["rows"]] == ["real"]


def surface_rows(grid, fid):
    """Hand-made teacher rows at the (guidance, steps) of `grid`, their FID given by `fid(g, n)`, and a real row."""
    return [dict(model="real", fid=1.0, nfe=None)] + [
        dict(model=evaluate.teacher_row_name(n, g, True), fid=fid(g, n), guidance=g, steps=n, nfe=2 * n) for g, n in grid]


def bowl(g, n):
    """An FID surface whose minimum is at guidance 4, DDIM-16."""
    return 10 + 2 * (g - 4) ** 2 + (np.log2(n) - 4) ** 2


def run_extension(rows, fid, budget=10, T=400):
    """evaluate.extend_grid on hand-made rows, each new row scored by `fid`; returns its record."""
    def score(g, n):
        rows.append(surface_rows([(g, n)], fid)[1])
    grid = {r["model"] for r in rows if r["model"] != "real"}
    return evaluate.extend_grid(rows, score, T, True, budget, grid)


def test_yardstick_interior_best_adds_no_row():
    """A best row inside the grid (guidance 4, DDIM-16 of 3 x 3 rows around it) has every neighbour scored and worse:
    nothing is added and the report calls it an interior minimum."""
    rows = surface_rows([(g, n) for g in (3, 4, 5) for n in (8, 16, 32)], bowl)
    record = run_extension(rows, bowl)
    assert record == dict(best="teacher-g4-ddim-16", rows_tried=9, grid_rows=9, added=[], interior=True, edges=[])
    assert len(rows) == 10


def test_yardstick_best_on_the_edge_extends_the_grid_to_the_minimum():
    """The Makefile's kind of grid (guidance 2, 3 x DDIM-2, 4, 8) on a surface whose minimum lies past both of its
    edges (guidance 4, DDIM-16): the best row sits on the grid's corner, so rows past it are scored, a step further
    (guidance + 1, twice the steps) each time the best moves, until the best has a worse neighbour on every side - the
    surface's minimum."""
    rows = surface_rows([(g, n) for g in (2, 3) for n in (2, 4, 8)], bowl)
    record = run_extension(rows, bowl)
    assert record["best"] == "teacher-g4-ddim-16" and record["interior"] and record["edges"] == []
    assert record["added"][:2] == ["teacher-g3-ddim-16", "teacher-g4-ddim-8"]  # the corner's two missing neighbours
    assert {"teacher-g5-ddim-16", "teacher-g4-ddim-32", "teacher-g3-ddim-16"} <= set(record["added"])
    assert record["rows_tried"] == 6 + len(record["added"]) == len(rows) - 1
    best, missing, _ = evaluate.grid_neighbours(rows, 400, True)
    assert best["model"] == "teacher-g4-ddim-16" and missing == []


def test_yardstick_names_the_edges_it_cannot_pass():
    """Past the lowest guidance is guidance 1 (no guidance), and no further; past T steps, nothing; a row budget that
    runs out is named with the rows it left unscored. Each makes the best 'not known to be a minimum'."""
    unguided_best = run_extension(surface_rows([(1.5, 4), (2, 4), (1.5, 8), (1.5, 2)], lambda g, n: g + abs(n - 4)),
                                  lambda g, n: g + abs(n - 4))
    assert unguided_best["best"] == "teacher-g1-ddim-4"  # then its step neighbours at guidance 1 are scored too
    assert unguided_best["added"] == ["teacher-g1-ddim-4", "teacher-g1-ddim-8", "teacher-g1-ddim-2"]
    assert unguided_best["edges"] == ["guidance 1 is no guidance"] and not unguided_best["interior"]
    full = run_extension(surface_rows([(2, 200), (2, 400), (1.5, 400), (2.5, 400)], lambda g, n: -n + abs(g - 2)),
                         lambda g, n: -n + abs(g - 2), T=400)
    assert full["added"] == [] and full["edges"] == ["DDIM-400 takes every one of the teacher's 400 steps"]
    short = run_extension(surface_rows([(2, 2), (2, 4), (3, 4)], bowl), bowl, budget=1)
    assert short["added"] == ["teacher-g3-ddim-8"] and short["best"] == "teacher-g3-ddim-8" and not short["interior"]
    assert short["edges"] == ["the budget of --extend-rows 1 rows past the grid was spent before teacher-g3-ddim-16, "
                              "teacher-g4-ddim-8, teacher-g2-ddim-8 could be scored"]


def test_yardstick_extension_end_to_end(mnist_run, tmp_path):
    """evaluate.py on a one-row grid (guidance 2, DDIM-1) scores the rows past its edges (twice the steps, the next
    guidance up), within --extend-rows; the report and its table say so, grid.png and fid_vs_nfe.png show every row;
    the same evaluation again reuses the added rows."""
    d = tmp_path / "run"
    shutil.copytree(mnist_run / "teacher", d / "teacher")
    run("evaluate.py", "--prepare", "--run-dir", d, "--classifier-epochs", 1)
    flags = ("--fid", "--run-dir", d, "--num-samples", 20, "--batch-size", 10, "--num-reference", 100, "--rows",
             "real,teacher", "--ddim-steps", 1, "--teacher-guidance", 2, "--extend-rows", 2)
    r = run("evaluate.py", *flags)
    report = read_json(d / "eval" / "report.json")
    y = report["yardstick"]
    assert y["added"] == ["teacher-g2-ddim-2", "teacher-g3-ddim-1"] and y["rows_tried"] == 3 and not y["interior"]
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["real", "teacher-g2-ddim-1", "teacher-g2-ddim-2", "teacher-g3-ddim-1"]
    assert (rows["teacher-g2-ddim-2"]["nfe"], rows["teacher-g3-ddim-1"]["nfe"]) == (4, 2)
    assert all(np.isfinite(row["fid"]) for row in rows.values())
    assert "Teacher yardstick: 3 DDIM rows tried (1 of the grid + 2 past its edges" in r.stdout
    assert "teacher-g1-ddim-1 could be scored" in y["edges"][-1]  # the third neighbour, past the budget
    from PIL import Image
    width, height = Image.open(d / "eval" / "grid.png").size
    assert 300 < width < 1200 and 4 * 50 < height < 4 * 90, (width, height)  # 4 labelled rows of 10 classes
    # rerun (here with no extension), the rows scored past the grid stay in: the report's best row cannot get worse
    run("evaluate.py", *flags[:-1], 0)
    again = read_json(d / "eval" / "report.json")
    assert [row["model"] for row in again["rows"]] == list(rows) and again["reused_rows"] == list(rows)
    assert again["yardstick"]["best"] == y["best"] and again["yardstick"]["rows_tried"] == 3


def test_refuses_evaluation_seeds_that_overlap_the_training_probe():
    """The probe scores the student during training on seeds PROBE_SEED.. (probe_samples of them, from dmd/config.json):
    an evaluation on any of those seeds is refused; one just after them is not."""
    args = argparse.Namespace(seed=PROBE_SEED + 15, num_samples=10, repeats=2)
    distilled, pairs = dict(probe_samples=20), dict(seed=0, num_pairs=48)  # as in pairs/meta.json and dmd/config.json
    with pytest.raises(UserError, match=f"overlap the training probe's {PROBE_SEED}..{PROBE_SEED + 19}"):
        evaluate.held_out_seeds(args, pairs, distilled)
    args.seed = PROBE_SEED + 20
    assert evaluate.held_out_seeds(args, pairs, distilled) == [PROBE_SEED + 20, PROBE_SEED + 40]
    assert evaluate.held_out_seeds(args, pairs, dict(probe_samples=0)) == [PROBE_SEED + 20, PROBE_SEED + 40]


def test_scores_known_cases():
    """torch-fidelity's FID, KID, precision and recall as metrics.scores wires them. A set against itself: FID 0,
    precision = recall = 1 and KID near 0 (the unbiased estimator reads slightly below 0 on identical samples); a new
    draw of the same distribution: KID near 0; a far-away set: precision = recall = 0."""
    torch.manual_seed(0)
    a, b = torch.randn(300, 16), torch.randn(300, 16)
    same, fresh, shifted = metrics.scores(a, a), metrics.scores(b, a), metrics.scores(a + 0.5, a)
    assert abs(same["fid"]) < 1e-6 and same["precision"] == 1 and same["recall"] == 1
    assert abs(same["kid"]) < 0.1 * shifted["kid"] and abs(fresh["kid"]) < 0.02 * shifted["kid"]
    far = metrics.scores(a + 50, a)
    assert far["precision"] == 0 and far["recall"] == 0 and far["kid"] > 1000 * shifted["kid"]
    half = metrics.scores(torch.cat([a[:150], a[150:] + 50]), a)  # half the samples on the data, half far away
    assert 0.45 <= half["precision"] <= 0.55 and half["recall"] > 0.4


@pytest.mark.parametrize("block", [10000, 64])
@pytest.mark.parametrize("kind", ["gaussian", "grid"])
def test_precision_recall_is_torch_fidelitys(monkeypatch, block, kind):
    """scores() computes precision and recall on a Reference's cached radii: the same numbers as torch-fidelity's
    prc_features_to_metric, also when the distances are computed in blocks (64 rows here), and on integer features
    whose distances tie with the radii (a ball includes its boundary)."""
    monkeypatch.setattr(metrics, "PRC_BATCH", block)
    torch.manual_seed(0)
    if kind == "gaussian":
        real, fake = torch.randn(500, 16), torch.randn(300, 16) + 0.6
    else:
        real, fake = torch.randint(0, 4, (500, 4)).float(), torch.randint(1, 5, (300, 4)).float()
    ref = metrics.Reference(real)
    expected = prc_features_to_metric(fake, real, save_cpu_ram=True, prc_batch_size=block, verbose=False)
    got = metrics.scores(fake, ref)
    assert 0.2 < expected["precision"] < 0.9 and 0.2 < expected["recall"] < 0.9  # neither end: a real test
    assert (got["precision"], got["recall"]) == (expected["precision"], expected["recall"])
    assert got == metrics.scores(fake, real)  # a tensor is made a Reference


def test_classifier_is_the_same_on_every_run(tmp_path):
    """Its weights (so the feature space, so the FID scale) depend only on the data and --seed, never on the run."""
    data = torch.utils.data.TensorDataset(torch.rand(256, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (256,)))

    torch.rand(7)  # whatever the global generator's state before
    a = metrics.train_classifier(data, data, str(tmp_path / "a"), num_classes=10, seed=0, epochs=1).state_dict()
    b = metrics.train_classifier(data, data, str(tmp_path / "b"), num_classes=10, seed=0, epochs=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
