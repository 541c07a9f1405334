"""Sample images from the teacher (multi-step), the one-step teacher before distillation, or the student.

    python sample.py --model teacher --sampling-steps 25       # DDIM-25 (eta 0); --full-ddpm for all T steps
    python sample.py --model onestep-teacher                   # G(z) = x̂0 of the teacher at t = T-1
    python sample.py --model student --out runs/mnist/samples  # the distilled generator (its K steps)

Sample i uses noise seed seed+i and (class-conditional) label i % 10, so every model sees the same inputs.
Writes a PNG grid; with --out DIR also DIR/samples.npz (uint8 images N x H x W x C, labels).
"""
import os

import numpy as np
import torch
from einops import rearrange

from cli import UserError, number, parse, run, script_parser
from data import read_prompts, save_grid, to_uint8
from files import DMD, STUDENT, STUDENT_BEST, STUDENT_EMA, atomic
from checkpoints import default_teacher, open_teacher, student_timesteps
from recipes import PRESETS, grid_columns
from sampling import generate, sample_generator, sample_teacher

MODELS = ("teacher", "onestep-teacher", "student", "student-ema", "student-best")


def main():
    p = script_parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="teacher", choices=MODELS, help="what to sample from")
    p.add_argument("--teacher", default=None, help="teacher folder or hub id; default <run-dir>/teacher (CIFAR-10: the hub id)")
    p.add_argument("--student", default=None, help="student folder; default <run-dir>/dmd/student (student_ema, student_best)")
    p.add_argument("--num-samples", type=number(int, 0), default=80, help="how many images")
    p.add_argument("--batch-size", type=number(int, 0), default=64, help="images per forward pass")
    p.add_argument("--sampling-steps", type=number(int, 0), default=25, help="DDIM steps for --model teacher")
    p.add_argument("--full-ddpm", action="store_true", help="ancestral DDPM over all T steps instead of DDIM (slow)")
    p.add_argument("--guidance", type=number(float, 0, inclusive=True), default=None, help="guidance scale for the multi-step teacher (class-conditional only); default recipes.default_guidance")
    p.add_argument("--prompts", default=None, help="a text-to-image teacher or student: the prompts, one a line; image i for prompt i %% their number")
    p.add_argument("--out", default=None, help="folder for samples.npz and the grid PNG; default: the grid only, in <run-dir>/samples/")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parse(p)
    source = model_source(args)
    den, args.guidance = open_teacher(source, args.dataset, args.guidance, args.device, read_prompts(args.prompts))
    timesteps = student_timesteps(source, den.T)  # [T-1] for the one-step teacher; a student's own K steps

    def sampler(noise, y, generator):
        if args.model == "teacher":
            return sample_teacher(den, noise, y, args.sampling_steps, args.guidance, args.full_ddpm, generator)
        return sample_generator(den, noise, y, timesteps)
    images, labels, _ = generate(den, sampler, range(args.num_samples), args.seed, args.batch_size, args.device,
                                 draws=1 if args.model == "teacher" else len(timesteps))
    out = args.out or os.path.join(args.run_dir, "samples")
    os.makedirs(out, exist_ok=True)
    name = f"{args.model}" + (f"-ddpm{den.T}" if args.full_ddpm else f"-ddim{args.sampling_steps}" if args.model == "teacher" else "")
    save_grid(images[:80], os.path.join(out, f"{name}.png"), nrow=grid_columns(den.num_classes))
    if args.out:
        u8 = rearrange(to_uint8(images), "n c h w -> n h w c").numpy()
        with atomic(os.path.join(out, "samples.npz")) as tmp:
            np.savez(tmp, images=u8, labels=labels.numpy() if labels is not None else np.zeros(0, np.int64))
    print(f"{name}: {len(images)} images -> {out}/{name}.png" + (f" and {out}/samples.npz" if args.out else ""))
    names = PRESETS[args.dataset].get("class_names")
    if names and grid_columns(den.num_classes) == len(names):  # one column per class
        print("columns: " + ", ".join(names))


def model_source(args):
    if args.model in ("teacher", "onestep-teacher"):
        return args.teacher or default_teacher(args.dataset, args.run_dir)
    folder = args.student or os.path.join(args.run_dir, DMD, {"student": STUDENT, "student-ema": STUDENT_EMA,
                                                             "student-best": STUDENT_BEST}[args.model])
    if not os.path.isdir(folder):
        raise UserError(f"no student in {folder}: run `python distill.py` first (with --ema for student-ema, a probe for student-best) or pass --student")
    return folder


if __name__ == "__main__":
    run(main)
