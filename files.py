"""Run folders and the files in them: the subfolder names, atomic writes, training states, and the one rule for
starting, resuming or refusing a run.

A run folder chains the scripts with no flags:
    <run-dir>/vae/          train_vae.py      (a latent teacher's autoencoder: train_teacher.py --vae reads it)
    <run-dir>/teacher/      train_teacher.py  (read by every other script)
    <run-dir>/pairs/        precompute.py     (read by distill.py)
    <run-dir>/dmd/          distill.py        (student/, student_ema/, student_best/, pipeline/ inside)
    <run-dir>/classifier/   evaluate.py       (the FID feature extractor where Inception cannot be had)
    <run-dir>/eval/         evaluate.py
    <run-dir>/latents/      train_teacher.py, distill.py (real images encoded by a latent teacher's VAE, cached)
"""
import contextlib
import json
import os
import pickle
import shutil

import torch

from cli import UserError

TEACHER, PAIRS, DMD, CLASSIFIER, EVAL = "teacher", "pairs", "dmd", "classifier", "eval"
VAE, LATENTS = "vae", "latents"
STUDENT, STUDENT_EMA, STUDENT_BEST = "student", "student_ema", "student_best"  # inside dmd/
PIPELINE = "pipeline"  # inside dmd/: the student as a diffusers pipeline, with its model card
STATE = "train_state.pt"  # the training state beside a run's outputs, for --resume


@contextlib.contextmanager
def atomic(path):
    """`with atomic(path) as tmp:` write to tmp; it is renamed to `path` only when the block finishes, so a reader
    (or a rerun after kill -9) never sees half a file. The extension is kept (x.png -> x.tmp.png) for writers that
    pick the format from it."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_folder(folder, *objects):
    """`save_pretrained` of each object (model, scheduler, ...) into a temporary folder, then every file renamed into
    `folder`: each file is whole at every moment."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for obj in objects:
        obj.save_pretrained(tmp)
    for here, _, names in os.walk(tmp):
        there = os.path.join(folder, os.path.relpath(here, tmp))
        os.makedirs(there, exist_ok=True)
        for name in names:
            os.replace(os.path.join(here, name), os.path.join(there, name))
    shutil.rmtree(tmp)


def write_json(obj, path):
    with atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def save_state(state, path):
    """A training state (tensors, numbers, lists, dicts only) for --resume."""
    with atomic(path) as tmp:
        torch.save(state, tmp)


def load_state(path):
    """Load a training state safely: tensors and plain containers only, never arbitrary pickled objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds pickled objects, which are refused for safety: use a state file written by "
                        f"this project")
    except (RuntimeError, EOFError) as e:
        raise UserError(f"{path} is unreadable ({str(e).splitlines()[0][:100]}): delete it and rerun without --resume")


def check_run_folder(out, resume, overwrite, what, finished=None):
    """The one rule for a training run's folder, checked before any work: a run in progress or finished is never
    silently restarted (--resume continues it, --overwrite starts again), and --resume needs a state to resume.
    `finished` names a file that marks a finished run which may have no state (a copied teacher folder)."""
    state = os.path.join(out, STATE)
    if resume and not os.path.exists(state):
        raise UserError(f"--resume: no {state} to resume from; drop --resume to start a new run")
    if resume or overwrite:
        return
    if os.path.exists(state) or (finished and os.path.exists(os.path.join(out, finished))):
        raise UserError(f"{out} holds {what}: pass --resume to continue it (e.g. with more --steps), --overwrite to "
                        f"start again, or another --run-dir")


def append_jsonl(row, path):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path, step):
    """Drop the rows logged after `step` (the checkpoint a run resumes from): they will be logged again."""
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if json.loads(line)["step"] <= step]
        with atomic(path) as tmp, open(tmp, "w") as f:
            f.writelines(rows)
