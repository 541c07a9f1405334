"""Data parallelism on 2 CPU processes (gloo) started by torchrun, as `accelerate launch` would start them.

The scripts pass Accelerator(cpu=True) when there is no GPU: a plain Accelerator() under torchrun on the CPU
silently trains each process alone, so every test asserts that there really were 2 processes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run, tiny_teacher
from safetensors.torch import load_file

from data import load_pairs

PORT = [29611]


def torchrun(script, *args):
    PORT[0] += 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(PORT[0]),
           os.path.join(ROOT, script), *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_precompute_two_processes_equals_one(tmp_path):
    for name in ("one", "two"):
        tiny_teacher(tmp_path / name / "teacher", "mnist", "v_prediction")
    args = ["--num-pairs", 12, "--shard-size", 3, "--sampling-steps", 2, "--generator-steps", 2]  # + the states at 199
    run("precompute.py", "--run-dir", tmp_path / "one", *args)
    r = torchrun("precompute.py", "--run-dir", tmp_path / "two", *args)
    assert "2 processes" in r.stdout
    one, two = load_pairs(str(tmp_path / "one" / "pairs")), load_pairs(str(tmp_path / "two" / "pairs"))
    assert one[0]["state_timesteps"] == [199]
    for a, b in zip(one[1:], two[1:]):
        assert torch.equal(a, b)  # same shards, same batches: bit for bit on the CPU


def test_distill_two_processes_match_one_with_double_batch(mnist_run, tmp_path):
    for name in ("one", "two"):
        shutil.copytree(mnist_run / "teacher", tmp_path / name / "teacher")
        shutil.copytree(mnist_run / "pairs", tmp_path / name / "pairs")
    common = ["--steps", 3, "--batch-size", 8, "--reg-loss", "pseudo_huber", "--lr", 1e-4, "--log-every", 1,
              "--probe-every", 0, "--ckpt-every", 3, "--sample-every", 100,
              "--gan-weight", 1e-2,  # the GAN head: two forwards of µfake's data-parallel wrapper per update
              "--divergence", "forward-kl", "--ratio-bins", 2]  # f-distill's weights: normalised over the GLOBAL batch
    run("distill.py", "--run-dir", tmp_path / "one", *common)
    torchrun("distill.py", "--run-dir", tmp_path / "two", *common)
    cfg = json.load(open(tmp_path / "two" / "dmd" / "config.json"))
    assert cfg["num_processes"] == 2 and cfg["per_process_batch"] == 4
    sums = json.load(open(tmp_path / "two" / "dmd" / "summary.json"))["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks hold identical netG and µfake
    first = [json.loads(open(tmp_path / name / "dmd" / "stats.jsonl").readline()) for name in ("one", "two")]
    for key in ("r_mean", "r_min", "r_max", "h_min", "h_max"):  # the first update's weights: all 8 samples, both ways
        assert first[1][key] == pytest.approx(first[0][key], rel=1e-3), key
    # 2 processes x batch 4 == 1 process x batch 8, up to the order of float sums. Adam turns a float-rounding
    # difference in a near-zero gradient into a full-size step, so compare the whole update, not single elements.
    w0 = load_file(tmp_path / "one" / "teacher" / "diffusion_pytorch_model.safetensors")
    w1 = load_file(tmp_path / "one" / "dmd" / "student" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(tmp_path / "two" / "dmd" / "student" / "diffusion_pytorch_model.safetensors")
    flat = lambda w: torch.cat([w[k].double().flatten() for k in sorted(w) if w[k].is_floating_point()])  # noqa: E731
    update, mismatch = (flat(w1) - flat(w0)).norm(), (flat(w1) - flat(w2)).norm()
    assert update > 0 and mismatch < 0.02 * update, (mismatch / update).item()
