import json
import shutil

import torch
from conftest import read_json, run, tiny_teacher
from safetensors.torch import load_file

FAST = ["--batch-size", 4, "--reg-loss", "pseudo_huber", "--log-every", 1, "--lr", 1e-4]


def fresh_run(mnist_run, tmp_path, name="run"):
    """A copy of the session's tiny teacher + pairs, so each test has its own dmd/ folder."""
    dst = tmp_path / name
    shutil.copytree(mnist_run / "teacher", dst / "teacher")
    shutil.copytree(mnist_run / "pairs", dst / "pairs")
    return dst


def test_few_step_run_writes_every_artefact(mnist_run, tmp_path):
    d = fresh_run(mnist_run, tmp_path)
    r = run("distill.py", "--run-dir", d, "--steps", 4, "--ckpt-every", 2, "--sample-every", 2, "--ema", 0.9,
            "--gen-every", 2, *FAST)
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
    assert [json.loads(l)["step"] for l in open(b / "dmd" / "stats.jsonl")] == [1, 2, 3, 4, 5]


def test_dmd2_needs_no_pairs_and_resumes_exactly(mnist_run, tmp_path):
    """DMD2: no pairs folder at all, a GAN head on real images, a 2-step generator with backward simulation; a run
    stopped after its first step and resumed reaches the uninterrupted run's weights bit for bit."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(mnist_run / "teacher", d / "teacher")  # and no pairs/
    args = ["--steps", 4, "--ckpt-every", 2, "--sample-every", 2, "--reg-weight", 0, "--gan-weight", 1e-2,
            "--generator-steps", 2, "--backward-simulation", "--gen-every", 2, *FAST]
    run("distill.py", "--run-dir", a, *args)
    run("distill.py", "--run-dir", b, *args, "--max-minutes", 1e-9)
    run("distill.py", "--run-dir", b, *args, "--resume")
    sa, sb = (torch.load(x / "dmd" / "train_state.pt", weights_only=True) for x in (a, b))
    for key in ("net_g", "mu_fake", "gan_head"):
        assert sa[key] and all(torch.equal(sa[key][k], sb[key][k]) for k in sa[key]), key
    assert read_json(a / "dmd" / "student" / "generator.json") == {"timesteps": [399, 199]}
    rows = [json.loads(line) for line in open(a / "dmd" / "stats.jsonl")]
    assert all(row["loss_reg"] == 0 for row in rows if "loss_reg" in row) and "loss_disc" in rows[-1]
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
