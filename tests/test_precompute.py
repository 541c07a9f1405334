import os
import shutil
import subprocess
import sys

import torch
from conftest import ROOT, read_json, run, tiny_teacher
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from data import load_pairs
from checkpoints import load_teacher
from models import Denoiser
from sampling import sample_teacher


def make_pairs(run_dir, *extra, check=True):
    return run("precompute.py", "--run-dir", run_dir, "--num-pairs", 10, "--shard-size", 4, "--sampling-steps", 3, *extra,
               check=check)


def test_pairs_do_not_depend_on_batch_size(tmp_path):
    for name, bs in (("a", 3), ("b", 8)):
        tiny_teacher(tmp_path / name / "teacher", "mnist", "v_prediction")
        make_pairs(tmp_path / name, "--batch-size", bs)
    _, za, xa, ya, _ = load_pairs(str(tmp_path / "a" / "pairs"))
    _, zb, xb, yb, _ = load_pairs(str(tmp_path / "b" / "pairs"))
    assert torch.equal(za, zb) and torch.equal(ya, yb)  # noise and labels: bit for bit
    # images: CPU kernels pick batch-size-dependent summation orders, so equal up to float rounding only
    torch.testing.assert_close(xa, xb, rtol=0, atol=1e-5)
    assert torch.equal(ya, torch.arange(10) % 10)


def test_interrupted_run_completed_by_rerun_equals_uninterrupted(tmp_path):
    for name in ("a", "b"):
        tiny_teacher(tmp_path / name / "teacher", "mnist", "v_prediction")
    make_pairs(tmp_path / "a")
    make_pairs(tmp_path / "b", "--max-shards", 1)  # stops after one shard, as an interruption would
    assert sorted(p.name for p in (tmp_path / "b" / "pairs").glob("shard_*")) == ["shard_00000.safetensors"]
    before = (tmp_path / "b" / "pairs" / "shard_00000.safetensors").stat().st_mtime_ns
    make_pairs(tmp_path / "b")
    assert (tmp_path / "b" / "pairs" / "shard_00000.safetensors").stat().st_mtime_ns == before  # skipped, not redone
    for k in range(3):
        a = load_file(tmp_path / "a" / "pairs" / f"shard_{k:05d}.safetensors")
        b = load_file(tmp_path / "b" / "pairs" / f"shard_{k:05d}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    r = make_pairs(tmp_path / "b")
    assert "nothing to do" in r.stdout


def ddim(den, steps):
    """diffusers' DDIM sampler on the teacher's schedule, trailing spacing (the reference the tests step by hand)."""
    sched = DDIMScheduler.from_config(den.schedule.scheduler.config, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    return sched


def test_pairs_are_ddim_from_their_noise_and_meta_is_complete(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher", "mnist", "v_prediction")
    make_pairs(tmp_path, "--guidance", 3, "--seed", 7)
    meta, z, x, y, states = load_pairs(str(tmp_path / "pairs"))
    for key, value in dict(teacher=teacher, sampler="ddim", eta=0.0, sampling_steps=3, guidance=3.0, seed=7,
                           num_pairs=10, num_shards=3, shape=[1, 28, 28], prediction_type="v_prediction").items():
        assert meta[key] == value, key
    assert len(meta["teacher_hash"]) == 16 and "state_timesteps" not in meta and states is None
    assert torch.equal(z[5], torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(7 + 5)))
    den = Denoiser(*load_teacher(teacher))
    torch.testing.assert_close(sample_teacher(den, z[:4], y[:4], 3, 3.0), x[:4], rtol=0, atol=1e-5)


def test_states_are_the_teachers_ddim_states_at_the_generators_timesteps(tmp_path):
    """--generator-steps 4 on DDIM-8: each pair keeps x_t where the sampler reaches t = 299, 199, 99 (T = 400), the
    state the DDIM step at that t starts from; the pairs themselves do not change."""
    teacher = tiny_teacher(tmp_path / "a" / "teacher", "mnist", "v_prediction")
    shutil.copytree(tmp_path / "a" / "teacher", tmp_path / "b" / "teacher")
    for name, extra in (("a", ()), ("b", ("--generator-steps", 4))):
        make_pairs(tmp_path / name, "--sampling-steps", 8, "--guidance", 2, *extra)
    _, z, x, y, none = load_pairs(str(tmp_path / "a" / "pairs"))
    meta, z_b, x_b, _, states = load_pairs(str(tmp_path / "b" / "pairs"))
    assert none is None and torch.equal(z, z_b) and torch.equal(x, x_b)
    assert meta["state_timesteps"] == [299, 199, 99] and states.shape == (10, 3, 1, 28, 28)
    den = Denoiser(*load_teacher(teacher))
    sched, x_t = ddim(den, 8), z[:4]
    for t in sched.timesteps:  # 399, 349, 299, ...: the state at 299 is the input after two steps
        for j, t_state in enumerate(meta["state_timesteps"]):
            if int(t) == t_state:
                torch.testing.assert_close(states[:4, j], x_t, rtol=0, atol=1e-5)
        x_t = sched.step(den.guided(x_t, t, y[:4], 2.0), t, x_t, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(x_t, x[:4], rtol=0, atol=1e-5)  # and the same loop ends at the pairs' images


def test_guidance_t_max_guides_only_the_steps_at_or_below_it(tmp_path):
    """--guidance-t-max 0.5 on DDIM-4 (t = 399, 299, 199, 99 of T = 400): the plain conditional teacher at 399 and 299,
    guidance at 199 and 99, as distill.py's µreal with the same flag; the meta says so."""
    teacher = tiny_teacher(tmp_path / "teacher", "mnist", "v_prediction")
    # a large s: a tiny net barely reads y, and the test must tell the guided steps from the others
    make_pairs(tmp_path, "--sampling-steps", 4, "--guidance", 100, "--guidance-t-max", 0.5)
    meta, z, x, y, _ = load_pairs(str(tmp_path / "pairs"))
    assert meta["guidance_t_max"] == 0.5
    den = Denoiser(*load_teacher(teacher))
    sched, x_t = ddim(den, 4), z[:4]
    for t in sched.timesteps:
        s = 100.0 if int(t) <= 200 else 1.0
        x_t = sched.step(den.guided(x_t, t, y[:4], s), t, x_t, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(x[:4], x_t, rtol=0, atol=1e-5)
    for everywhere in (1.0, 100.0):  # neither the unguided nor the guided-everywhere sampler
        assert (sample_teacher(den, z[:4], y[:4], 4, everywhere) - x[:4]).abs().max() > 1e-4  # 10x the atol above


def test_log_to_a_file_has_status_lines_not_redrawn_bars(tmp_path):
    """stderr to a file (not a terminal): the progress bar is plain lines, no carriage-return redraws."""
    tiny_teacher(tmp_path / "teacher", "mnist", "v_prediction")
    with open(tmp_path / "log", "w") as log:
        subprocess.run([sys.executable, os.path.join(ROOT, "precompute.py"), "--run-dir", str(tmp_path), "--num-pairs",
                        "4", "--sampling-steps", "2"], cwd=ROOT, stdout=log, stderr=log, check=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES=""))
    log = (tmp_path / "log").read_bytes()  # bytes: reading text would turn carriage returns into newlines
    assert b"\r" not in log and b"pairs: 100%" in log


def test_rerun_with_another_teacher_is_refused(tmp_path):
    tiny_teacher(tmp_path / "teacher", "mnist", "v_prediction", seed=0)
    make_pairs(tmp_path)
    tiny_teacher(tmp_path / "teacher", "mnist", "v_prediction", seed=1)  # retrained teacher, same folder
    r = make_pairs(tmp_path, check=False)
    assert r.returncode == 2 and "teacher_hash" in r.stderr and "--overwrite" in r.stderr
    assert read_json(tmp_path / "pairs" / "meta.json")["num_pairs"] == 10  # untouched


def test_the_teachers_best_row_sets_the_pairs_and_the_guidance(mnist_run, tmp_path):
    """precompute.py --best-row and distill.py --guidance best read the teacher's best row over steps x guidance from
    <run-dir>/eval/report.json (made by evaluate.py for this very teacher); without one, or with another teacher's,
    each refuses with one line."""
    from checkpoints import weights_hash
    from files import write_json
    d = tmp_path / "run"
    shutil.copytree(mnist_run / "teacher", d / "teacher")
    missing = run("precompute.py", "--run-dir", d, "--best-row", "--num-pairs", 8, check=False, limit=60)
    assert missing.returncode == 2 and "--best-row needs this teacher's evaluation" in missing.stderr
    rows = [dict(model="real", fid=1.0), dict(model="teacher-g3-ddim-4", fid=9.0, guidance=3.0, steps=4),
            dict(model="teacher-g1.5-ddim-2", fid=7.0, guidance=1.5, steps=2),  # the best
            dict(model="onestep-before-guided", fid=5.0, guidance=2.0)]  # not a DDIM row
    (d / "eval").mkdir()
    write_json(dict(setup=dict(teacher_hash="0" * 16), rows=rows), d / "eval" / "report.json")
    other = run("distill.py", "--run-dir", d, "--guidance", "best", "--reg-weight", 0, "--steps", 1, check=False, limit=60)
    assert other.returncode == 2 and "--guidance best needs this teacher's evaluation" in other.stderr
    write_json(dict(setup=dict(teacher_hash=weights_hash(str(d / "teacher"))), rows=rows), d / "eval" / "report.json")
    run("precompute.py", "--run-dir", d, "--best-row", "--num-pairs", 8, "--shard-size", 8)
    meta = read_json(d / "pairs" / "meta.json")
    assert (meta["sampling_steps"], meta["guidance"]) == (2, 1.5)
    run("distill.py", "--run-dir", d, "--guidance", "best", "--reg-weight", 0, "--steps", 1, "--batch-size", 4,
        "--probe-every", 0)
    assert read_json(d / "dmd" / "config.json")["guidance"] == 1.5
