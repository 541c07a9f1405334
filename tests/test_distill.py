import argparse
import json
import os
import shutil

import pytest
import torch
from conftest import ROOT, read_json, run, tiny_teacher
from metrics import Classifier
from safetensors.torch import load_file

FAST = ["--batch-size", 4, "--reg-loss", "pseudo_huber", "--log-every", 1, "--lr", 1e-4]


def fresh_run(mnist_run, tmp_path, name="run"):
    """A copy of the test run's tiny teacher + pairs, so each test has its own dmd/ folder."""
    dst = tmp_path / name
    shutil.copytree(mnist_run / "teacher", dst / "teacher")
    shutil.copytree(mnist_run / "pairs", dst / "pairs")
    return dst


def random_classifier(folder):
    """A feature classifier with random weights where `evaluate.py --prepare` would train one: enough to run the
    training probe (its numbers are meaningless)."""
    torch.manual_seed(0)
    Classifier(in_channels=1, num_outputs=10, width=4, feature_dim=8).save_pretrained(folder)


def test_few_step_run_writes_every_artefact(mnist_run, tmp_path):
    """Every artefact; with --ema, the probe scores netG and its EMA, and the EMA is the student kept and shipped."""
    d = fresh_run(mnist_run, tmp_path)
    random_classifier(d / "classifier")
    r = run("distill.py", "--run-dir", d, "--steps", 4, "--ckpt-every", 2, "--sample-every", 2, "--ema", 0.9,
            "--gen-every", 2, "--probe-every", 2, "--probe-samples", 20, *FAST)
    out = d / "dmd"
    for f in ("config.json", "summary.json", "stats.jsonl", "loss_curves.png", "samples.png", "samples/step_000002.png",
              "student/config.json", "student/diffusion_pytorch_model.safetensors", "student/scheduler_config.json",
              "student_ema/diffusion_pytorch_model.safetensors", "train_state.pt"):
        assert (out / f).is_file(), f
    cfg, summary = read_json(out / "config.json"), read_json(out / "summary.json")
    assert summary["steps_done"] == 4 and cfg["reg_loss_used"] == "pseudo_huber" and cfg["gen_every"] == 2
    before, after = summary["mu_real_checksum"]
    assert before == after  # µreal never changes
    rows = [json.loads(line) for line in open(out / "stats.jsonl")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["g_updates"] for row in rows] == [1, 1, 2, 2]  # --gen-every 2: netG updates on steps 0, 2
    for key in ("loss_fake", "grad_fake", "ms_per_step"):
        assert all(key in row for row in rows)
    assert "step 4 |" in r.stdout  # one status line per interval
    probed = [row for row in rows if "probe_fid" in row]
    assert [row["step"] for row in probed] == [2, 4] and all("probe_fid_ema" in row for row in probed)
    assert all(0 <= row["probe_recall"] <= 1 and 0 <= row["probe_precision"] <= 1 and 0 < row["probe_hf"] < 1
               for row in probed)
    best = read_json(out / "student_best" / "probe.json")
    assert best["of"] == "student_ema" and best["probe_fid"] == min(row["probe_fid_ema"] for row in probed)
    assert summary["exported"] == "student_ema"  # the pipeline ships the EMA, bit for bit
    ema = load_file(out / "student_ema" / "diffusion_pytorch_model.safetensors")
    shipped = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert ema.keys() == shipped.keys() and all(torch.equal(ema[k], shipped[k]) for k in ema)
    # the student loads as a teacher-format folder and samples in one step
    run("sample.py", "--run-dir", d, "--model", "student", "--num-samples", 4, "--out", d / "s")
    assert (d / "s" / "samples.npz").is_file()


def test_resume_reaches_the_same_weights(mnist_run, tmp_path):
    a, b = fresh_run(mnist_run, tmp_path, "a"), fresh_run(mnist_run, tmp_path, "b")
    args = ["--steps", 5, "--ckpt-every", 2, "--sample-every", 100, "--ema", 0.9, *FAST]
    run("distill.py", "--run-dir", a, *args)
    run("distill.py", "--run-dir", b, *args, "--max-minutes", 1e-9)  # stops (and checkpoints) after step 1
    assert torch.load(b / "dmd" / "train_state.pt", weights_only=True)["step"] == 1
    run("distill.py", "--run-dir", b, *args, "--resume")
    for name in ("student", "student_ema"):
        wa = load_file(a / "dmd" / name / "diffusion_pytorch_model.safetensors")
        wb = load_file(b / "dmd" / name / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = (torch.load(x / "dmd" / "train_state.pt", weights_only=True) for x in (a, b))
    assert all(torch.equal(sa["mu_fake"][k], sb["mu_fake"][k]) for k in sa["mu_fake"])
    # the default schedule (cosine, decayed to 0 at the last step) resumes where it was
    assert sa["sched_g"] == sb["sched_g"] and sa["opt_g"]["param_groups"][0]["lr"] == 0.0
    lrs = [json.loads(l)["lr_g"] for l in open(a / "dmd" / "stats.jsonl")]
    assert lrs[0] == 1e-4 and all(x > y for x, y in zip(lrs, lrs[1:]))  # FAST's --lr, then falling every step
    assert [json.loads(l)["step"] for l in open(b / "dmd" / "stats.jsonl")] == [1, 2, 3, 4, 5]


def test_dmd2_needs_no_pairs_and_resumes_exactly(mnist_run, tmp_path):
    """DMD2: no pairs folder at all, a GAN head on real images, a 2-step generator with backward simulation, the
    Jensen-Shannon weighting (f-distill); a run stopped after its first step and resumed reaches the uninterrupted
    run's weights bit for bit, and logs the density ratio and weights."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(mnist_run / "teacher", d / "teacher")  # and no pairs/
    args = ["--steps", 4, "--ckpt-every", 2, "--sample-every", 2, "--reg-weight", 0, "--gan-weight", 1e-2,
            "--generator-steps", 2, "--backward-simulation", "--gen-every", 2, "--divergence", "js", *FAST]
    run("distill.py", "--run-dir", a, *args)
    run("distill.py", "--run-dir", b, *args, "--max-minutes", 1e-9)
    assert torch.load(b / "dmd" / "train_state.pt", weights_only=True)["step"] == 1  # really stopped early
    run("distill.py", "--run-dir", b, *args, "--resume")
    sa, sb = (torch.load(x / "dmd" / "train_state.pt", weights_only=True) for x in (a, b))
    for key in ("net_g", "mu_fake", "gan_head"):
        assert sa[key] and all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), key
    assert read_json(a / "dmd" / "student" / "generator.json") == {"timesteps": [399, 199]}
    assert read_json(a / "dmd" / "config.json")["reg_loss_used"] == "none"  # no regression loss built, no LPIPS notice
    rows = [json.loads(line) for line in open(a / "dmd" / "stats.jsonl")]
    assert all(row["loss_reg"] == 0 for row in rows if "loss_reg" in row) and "loss_disc" in rows[-1]
    assert 0.1 <= rows[-1]["r_min"] <= rows[-1]["r_mean"] <= rows[-1]["r_max"] <= 20
    assert rows[-1]["h_min"] <= rows[-1]["h_mean"] == pytest.approx(1) and rows[-1]["h_max"] >= 1
    run("sample.py", "--run-dir", a, "--model", "student", "--num-samples", 4, "--out", a / "s")
    assert (a / "s" / "samples.npz").is_file()


def test_refuses_pairs_from_another_teacher_or_guidance(mnist_run, tmp_path):
    d = fresh_run(mnist_run, tmp_path)
    r = run("distill.py", "--run-dir", d, "--steps", 1, "--guidance", 3, *FAST, check=False)
    assert r.returncode == 2 and "guidance 2.0" in r.stderr
    tiny_teacher(d / "teacher", "mnist", "v_prediction", seed=5)
    r = run("distill.py", "--run-dir", d, "--steps", 1, *FAST, check=False)
    assert r.returncode == 2 and "another teacher" in r.stderr
    assert not (d / "dmd" / "train_state.pt").exists()


def test_lr_schedule_warms_up_and_ends_at_zero():
    """--warmup-steps ramps both lrs up linearly; linear and cosine reach 0 at --steps; constant stays."""
    from distill import lr_schedule
    for kind, end in (("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = lr_schedule(argparse.Namespace(lr_schedule=kind, warmup_steps=4, steps=10), opt)
        lrs = []
        for _ in range(10):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        assert lrs[:5] == [0.0, 0.25, 0.5, 0.75, 1.0] and sched.get_last_lr()[0] == end, kind


def test_the_demo_runs_a_fixed_number_of_steps():
    """The demo's DMD stage stops at a step count, never on the wall clock, so any machine reproduces its table."""
    make = open(os.path.join(ROOT, "Makefile")).read()
    flags = make.split("DISTILL_FLAGS ?=")[1].split("\n\n")[0]
    assert "--max-minutes" not in flags and "--steps" in flags


def test_regression_warm_start_then_dmd2_from_it(mnist_run, tmp_path):
    """The recipe's two runs: regression alone (--dm-weight 0 --gan-weight 0) into --out kd trains netG every step and
    never µfake; DMD2 with --generator-init kd/student starts netG from those weights (not the teacher's). A student
    of another teacher is refused with one line."""
    d = fresh_run(mnist_run, tmp_path)
    run("distill.py", "--run-dir", d, "--out", "kd", "--steps", 3, "--dm-weight", 0, "--gan-weight", 0,
        "--reg-weight", 1, "--probe-every", 0, *FAST)
    rows = [json.loads(line) for line in open(d / "kd" / "stats.jsonl")]
    assert [row["g_updates"] for row in rows] == [1, 2, 3] and not any("loss_fake" in row for row in rows)
    state = torch.load(d / "kd" / "train_state.pt", weights_only=True)
    teacher = load_file(d / "teacher" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(state["mu_fake"][k], teacher[k]) for k in teacher)  # µfake: never updated
    assert not all(torch.equal(state["net_g"][k], teacher[k]) for k in teacher)  # netG: trained
    assert not (d / "dmd").exists()
    run("distill.py", "--run-dir", d, "--generator-init", d / "kd" / "student", "--steps", 1, "--reg-weight", 0,
        "--gen-every", 2, "--lr", 1e-30, "--probe-every", 0, "--batch-size", 4)  # ~0 lr: netG stays put
    kd, dmd_student = (load_file(d / f / "student" / "diffusion_pytorch_model.safetensors") for f in ("kd", "dmd"))
    assert all(torch.equal(kd[k], dmd_student[k]) for k in kd)
    other = fresh_run(mnist_run, tmp_path, "other")
    tiny_teacher(other / "teacher", "mnist", "v_prediction", seed=5)
    bad = run("distill.py", "--run-dir", other, "--generator-init", d / "kd" / "student", "--steps", 1, "--reg-weight",
              0, "--batch-size", 4, check=False, limit=60)
    assert bad.returncode == 2 and "was not distilled from this teacher" in bad.stderr


def test_k_step_warm_start_on_the_teachers_states_end_to_end(tmp_path):
    """precompute.py --generator-steps 2 keeps the states, distill.py --reg-step-inputs teacher trains on them (netG's
    step-1 input is the pairs' state: without them the step could not run) and records it; a resume that would
    switch to noised inputs is refused."""
    tiny_teacher(tmp_path / "teacher", "mnist", "v_prediction")
    run("precompute.py", "--run-dir", tmp_path, "--num-pairs", 8, "--sampling-steps", 2, "--generator-steps", 2)
    kd = ["--run-dir", tmp_path, "--out", "kd", "--generator-steps", 2, "--dm-weight", 0, "--gan-weight", 0,
          "--reg-weight", 1, "--probe-every", 0, "--ckpt-every", 1, *FAST]
    run("distill.py", *kd, "--steps", 2, "--reg-step-inputs", "teacher")
    assert read_json(tmp_path / "kd" / "config.json")["reg_step_inputs"] == "teacher"
    assert len((tmp_path / "kd" / "stats.jsonl").read_text().splitlines()) == 2
    bad = run("distill.py", *kd, "--steps", 3, "--resume", check=False, limit=60)
    assert bad.returncode == 2 and "cannot --resume" in bad.stderr and "--reg-step-inputs" in bad.stderr
