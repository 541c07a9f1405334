"""Precompute noise -> image pairs (z, y, x) from the teacher with deterministic DDIM (eta = 0).

    python precompute.py --dataset mnist                # reads runs/mnist/teacher, writes runs/mnist/pairs
    accelerate launch precompute.py --dataset cifar10   # shards split across processes, same pairs

Pair i uses noise seed seed+i and label i % 10 (MNIST), so it does not depend on batch size or process
count, and (z, x) is a function: the regression loss of distill.py is well posed. Shards are written
atomically (write, then rename); a rerun skips finished shards, so an interrupted run loses at most
the shard in progress. meta.json names the teacher (and a hash of its weights) and the sampler.
With --generator-steps K, each pair also keeps the teacher's DDIM states x_t at the K-step generator's later
timesteps (`states`), the inputs of distill.py's K-step warm start with --reg-step-inputs teacher.
"""
import math
import os
import shutil
import time

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from cli import UserError, keep_freed_memory, number, parse, progress, run, script_parser
from data import PAIR_SETTINGS, read_prompts, save_grid, shard_ok, shard_path, shard_size
from files import PAIRS, atomic, load_json, write_json
from checkpoints import default_teacher, open_teacher, weights_hash
from metrics import required_best_teacher_row
from recipes import PRESETS, grid_columns
from sampling import balanced_labels, generator_timesteps, sample_teacher, seeded_noise


def main():
    p = script_parser(__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher folder or hub id; default <run-dir>/teacher (CIFAR-10: the hub id)")
    p.add_argument("--num-pairs", type=number(int, 0), default=None, help="pairs to make (seed: 12,800 MNIST/CelebA, 4,864 CIFAR-10)")
    p.add_argument("--sampling-steps", type=number(int, 0), default=None, help="DDIM steps (eta 0); default 25")
    p.add_argument("--guidance", type=number(float, 0, inclusive=True), default=None,
                   help="classifier-free guidance scale s (1 = none); default recipes.default_guidance")
    p.add_argument("--best-row", action="store_true",
                   help="the DDIM steps and guidance of the teacher's best row over steps x guidance, as `evaluate.py "
                        "--fid` measured this teacher in <run-dir>/eval/report.json: the pairs are the teacher at its best")
    p.add_argument("--guidance-t-max", type=number(float, 0), default=1.0,
                   help="guidance only at the DDIM steps with t <= this x T, the conditional teacher unguided above (1 = "
                        "every step): the pairs from the same teacher as distill.py --guidance-t-max's µreal")
    p.add_argument("--generator-steps", type=number(int, 0), default=1,
                   help="K > 1: also keep the DDIM state x_t at the K-step generator's timesteps t_1..t_{K-1} (they must "
                        "lie on the sampler's grid: K divides the teacher's T, DDIM steps a multiple of K), the K-step "
                        "warm start's inputs (distill.py --reg-step-inputs teacher)")
    p.add_argument("--prompts", default=None, help="a text-to-image teacher: the prompts, one a line; pair i is made for prompt i %% their number")
    p.add_argument("--batch-size", type=number(int, 0), default=64, help="pairs per forward pass (does not change the pairs)")
    p.add_argument("--shard-size", type=number(int, 0), default=512, help="pairs per shard file (the unit of resumption)")
    p.add_argument("--max-shards", type=number(int, 0), default=None, help="make at most N shards in this call (e.g. to fit a job time limit); rerun to continue")
    p.add_argument("--overwrite", action="store_true", help="delete pairs made with other settings in <run-dir>/pairs")
    args = parse(p)
    recipe = PRESETS[args.dataset]
    args.num_pairs = args.num_pairs or recipe["num_pairs"]
    source = args.teacher or default_teacher(args.dataset, args.run_dir)
    if args.guidance not in (None, 1.0) and recipe["num_classes"] == 0:
        raise UserError(f"--guidance {args.guidance} needs a class-conditional teacher; {args.dataset} is unconditional: drop --guidance")
    out = os.path.join(args.run_dir, PAIRS)
    if args.best_row and (args.sampling_steps or args.guidance is not None):
        raise UserError("--best-row takes the DDIM steps and guidance of the teacher's best row: drop --sampling-steps "
                        "and --guidance, or drop --best-row")
    if args.guidance_t_max > 1:
        raise UserError(f"--guidance-t-max {args.guidance_t_max}: a fraction of T, at most 1 (1 = guidance at every step)")
    args.sampling_steps = args.sampling_steps or 25
    if args.best_row:
        best = required_best_teacher_row(args.run_dir, weights_hash(source), "--best-row", "--sampling-steps and --guidance")
        args.sampling_steps, args.guidance = best["steps"], best["guidance"]
        print(f"pairs: the teacher's best row {best['model']} (FID {best['fid']:.2f}): DDIM-{args.sampling_steps}, "
              f"guidance {args.guidance:g}")

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: processes really split the work under torchrun
    prompts = read_prompts(args.prompts)
    den, args.guidance = open_teacher(source, args.dataset, args.guidance, accelerator.device, prompts)
    state_ts = generator_timesteps(den.T, args.generator_steps)[1:]  # none for K = 1
    grid = den.schedule.sampling_timesteps(args.sampling_steps)
    if not set(state_ts) <= set(grid):
        fix = ("drop --best-row and pass --sampling-steps (a multiple of K) and --guidance" if args.best_row else
               "pass --sampling-steps a multiple of K")
        raise UserError(f"--generator-steps {args.generator_steps}: its timesteps {state_ts} are not all among "
                        f"DDIM-{args.sampling_steps}'s: {fix}, or drop --generator-steps")
    n_shards = math.ceil(args.num_pairs / args.shard_size)
    meta = dict(dataset=args.dataset, teacher=source, teacher_hash=weights_hash(source),
                prediction_type=den.prediction_type, sampler="ddim" if den.schedule.kind == "ddpm" else "euler",
                eta=0.0, timestep_spacing="trailing",
                sampling_steps=args.sampling_steps, guidance=args.guidance, seed=args.seed, num_pairs=args.num_pairs,
                shard_size=args.shard_size, num_shards=n_shards, shape=list(den.shape), dtype="float32",
                labels="i % num_classes" if den.num_classes else None, num_classes=den.num_classes)
    if args.guidance_t_max < 1:
        meta["guidance_t_max"] = args.guidance_t_max
    if prompts:
        meta["prompts"] = prompts  # the labels are the prompts' indices
    if state_ts:
        meta["state_timesteps"] = state_ts
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):
        old = load_json(meta_path)
        settings = PAIR_SETTINGS + ("num_pairs", "shard_size", "guidance_t_max", "state_timesteps", "prompts")
        diff = [k for k in settings if old.get(k) != meta.get(k)]
        if diff and not args.overwrite:
            raise UserError(f"{out} holds pairs made with other settings ({', '.join(f'{k}: {old.get(k)} vs {meta.get(k)}' for k in diff)}): "
                f"pass --overwrite to replace them or use another --run-dir")
        if diff:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(out)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        write_json(meta, meta_path)
    accelerator.wait_for_everyone()

    # Shard k belongs to process k % world; a rerun makes only the shards that are missing or unreadable.
    todo = [k for k in range(n_shards) if not shard_ok(out, k, meta)]
    accelerator.wait_for_everyone()  # every process has looked before any writes
    mine = [k for k in todo if k % accelerator.num_processes == accelerator.process_index][:args.max_shards]
    n_todo = sum(shard_size(meta, k) for k in todo)
    if accelerator.is_main_process and not todo:
        print(f"pairs: all {n_shards} shards already in {out}; nothing to do")
    t0 = time.time()
    bar = progress(total=sum(shard_size(meta, k) for k in mine), unit="pair", desc="pairs",
               disable=not accelerator.is_main_process or not todo)
    for k in mine:
        idx = list(range(k * args.shard_size, min((k + 1) * args.shard_size, args.num_pairs)))
        zs, xs, ss = [], [], []
        for i in range(0, len(idx), args.batch_size):
            batch = idx[i:i + args.batch_size]
            z = seeded_noise(batch, den.shape, args.seed)
            y = balanced_labels(batch, den.num_classes)
            states = dict.fromkeys(state_ts)
            x = sample_teacher(den, z.to(accelerator.device), y.to(accelerator.device) if y is not None else None,
                               args.sampling_steps, args.guidance, states_at=states, guidance_t_max=args.guidance_t_max)
            zs.append(z)
            xs.append(x.float().cpu())
            if state_ts:
                ss.append(torch.stack([states[t] for t in state_ts], dim=1).float().cpu())
            bar.update(len(batch))
        shard = {"noise": torch.cat(zs).contiguous(), "image": torch.cat(xs).contiguous()}
        if state_ts:
            shard["states"] = torch.cat(ss).contiguous()  # (n, K-1, C, H, W): x_t at t_1 .. t_{K-1}
        if den.num_classes:
            shard["label"] = balanced_labels(idx, den.num_classes)
        with atomic(shard_path(out, k)) as tmp:
            save_file(shard, tmp, metadata={"first_index": str(idx[0])})
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and todo:
        with torch.no_grad():  # (a latent teacher's pairs are latents: the preview shows their images)
            first = den.decode(load_file(shard_path(out, 0))["image"][:80].to(accelerator.device)).cpu()
        save_grid(first, os.path.join(out, "preview.png"), nrow=grid_columns(den.num_classes))
        dt = time.time() - t0
        print(f"pairs: {n_todo} written in {dt:.1f} s ({n_todo / dt:.1f} pairs/s, "
              f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}) -> {out}")


if __name__ == "__main__":
    keep_freed_memory()  # CPU speed (cli.keep_freed_memory)
    run(main)
