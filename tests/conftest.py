"""Shared fixtures: tiny teachers saved in diffusers format, and helpers that run a script as a user would."""
import contextlib
import gzip
import importlib
import io
import json
import os
import signal
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# every script the tests run, in this process or a new one, runs as on a machine without network or GPU (set before
# diffusers' import, where huggingface_hub reads HF_HUB_OFFLINE)
os.environ.update(HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")

import cli  # noqa: E402
from checkpoints import save_teacher  # noqa: E402
from models import make_teacher  # noqa: E402

# Tiny UNet2DModel for the 3-channel datasets: the real configs are exercised by the parameter-count tests.
TINY_UNET = {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
             "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}
TINY_N_FEAT = 8


def run(script, *args, check=True, fresh=False, limit=600):
    """`python script args...` as a user runs it (from the repo root, offline, on the CPU); returns the
    CompletedProcess (exit code, stdout, stderr), and with `check` a nonzero exit fails the test with stderr's tail.
    By default the script's main() runs in this process under cli.run, as its last line runs it: a new interpreter's
    imports cost ~10 s of CPU a run, most of what the suite's end-to-end tests would spend. `fresh=True` starts a
    real `python script` process (what argparse and a hub lookup do at start-up, runs in parallel threads). A run still
    going after `limit` seconds fails (tests of bad input give 60: input that is not refused would run a whole job).
    An exception other than the script's own exit fails the test with its traceback."""
    if fresh:
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                           capture_output=True, text=True, timeout=limit)
    else:
        main = importlib.import_module(script.removesuffix(".py")).main
        out, err = io.StringIO(), io.StringIO()

        def too_long(signum, frame):
            raise TimeoutError(f"{script} {' '.join(map(str, args))} still running after {limit} s")
        previous = signal.signal(signal.SIGALRM, too_long)
        signal.alarm(limit)
        with mock.patch.object(sys, "argv", [script, *map(str, args)]), contextlib.chdir(ROOT), \
                contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                cli.run(main)
                code = 0
            except SystemExit as e:
                code = e.code
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
        r = subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
    if check and r.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r


def tiny_teacher(folder, dataset="mnist", prediction_type="epsilon", seed=0):
    torch.manual_seed(seed)
    backbone, scheduler = make_teacher(dataset, prediction_type, n_feat=TINY_N_FEAT, unet=TINY_UNET)
    save_teacher(backbone, scheduler, str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory):
    """A run folder with a tiny v-prediction MNIST teacher and 48 precomputed pairs."""
    run_dir = tmp_path_factory.mktemp("mnist_run")
    tiny_teacher(run_dir / "teacher", "mnist", "v_prediction")
    run("precompute.py", "--run-dir", run_dir, "--num-pairs", 48, "--shard-size", 16, "--sampling-steps", 3)
    return run_dir


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_idx(path, array, gz):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_mnist(folder, n=20, gz=False):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
    ext = ".gz" if gz else ""
    write_idx(os.path.join(folder, "train-images-idx3-ubyte" + ext), images, gz)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte" + ext), labels, gz)
    return images, labels


def fake_images(folder, n=8, size=40):
    """A folder of random RGB images (stands in for CelebA / CIFAR-10)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(folder)
