"""Distribution Matching Distillation: train a one-step (or K-step) generator G from a multi-step teacher.

    python distill.py --lr 5e-6                      # DMD: reads runs/mnist/{teacher,pairs}, writes runs/mnist/dmd
    python distill.py --reg-weight 0 --gen-every 5 --gan-weight 3e-3    # DMD2: no pairs, a GAN on real images
    accelerate launch distill.py --mixed-precision bf16 --dataset cifar10

The step itself (draw a batch, update netG, update µfake) is in dmd.py; this file is the loop around it: set-up,
logging, sample grids, the quality probe and checkpoints. docs/ALGORITHM.md has the equations.
"""
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.utils import make_grid

import dmd
from cli import UserError, keep_freed_memory, number, parse, progress, run, script_parser
from data import (Relabelled, captioned, class_names_of_data, encoded_dataset, load_pairs, load_splits, prompt_classes,
                  read_prompts, save_grid)
from files import (CLASSIFIER, DMD, EVAL, LATENTS, PAIRS, VAE, TEACHER, PIPELINE, STATE, STUDENT, STUDENT_BEST, STUDENT_EMA, append_jsonl, atomic,
                   check_run_folder, load_json, load_state, save_state, truncate_jsonl, write_json)
from losses import regression_loss
from metrics import best_teacher_row, make_probe, required_best_teacher_row
from checkpoints import default_teacher, load_teacher, open_teacher, save_pipeline, save_student, weights_hash
from models import Denoiser, cast_frozen, make_dmd_networks
from recipes import PRESETS, grid_columns
from sampling import (GRID_SEED, PROBE_SEED, balanced_labels, generator_timesteps, sample_generator, sample_teacher,
                      seeded_noise)


def parse_args():
    """The loop's flags here, the DMD step's in dmd.add_arguments; per-dataset defaults from recipes.py."""
    p = script_parser(__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher folder or hub id; default <run-dir>/teacher (CIFAR-10: the hub id)")
    p.add_argument("--pairs", default=None, help="precomputed pairs folder; default <run-dir>/pairs")
    p.add_argument("--generator-init", default=None,
                   help="a student folder (dmd/student of an earlier run on this teacher) netG starts from instead of "
                        "the teacher, e.g. one trained by regression alone (docs/RESULTS.md); µfake still starts as the teacher")
    p.add_argument("--lr", type=number(float, 0), default=None, help="netG learning rate (seed: 5e-6 MNIST/CelebA, 1e-6 CIFAR-10)")
    p.add_argument("--lr-fake", type=number(float, 0), default=None,
                   help="µfake (and GAN head) learning rate; default --lr (K = 4 on the CPU demo wants 20x: 1e-4 at "
                        "--lr 5e-6, so µfake keeps up with netG; docs/RESULTS.md)")
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "linear", "cosine"],
                   help="both lrs over the steps, after the warm-up: constant (DMD2), or decayed to 0 at the last step, "
                        "so the run ends on its smallest updates instead of wherever a constant lr left it")
    p.add_argument("--warmup-steps", type=number(int, 0, inclusive=True), default=0, help="linear lr warm-up from 0 (DMD2: 500)")
    p.add_argument("--batch-size", type=number(int, 0), default=64, help="global batch of fresh noise, and of pairs (seed: 64)")
    p.add_argument("--steps", type=number(int, 0), default=None, help="training steps (seed: 2000 MNIST/CelebA, 1520 CIFAR-10)")
    p.add_argument("--max-minutes", type=number(float, 0), default=None, help="also stop after this much wall time (a cluster job's limit; results then depend on the machine's speed)")
    p.add_argument("--ema", type=number(float, 0, inclusive=True), default=0.0,
                   help="EMA decay of netG's weights (0 = off); when on, the EMA is the student the probe keeps and the pipeline ships (student_ema/)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="autocast (bf16 recommended on GPU; DMD2 saw fp16 diverge)")
    p.add_argument("--frozen-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="what the frozen parts are stored in: µreal (or --lora-rank's shared base), a latent teacher's "
                        "VAE, a text encoder; bfloat16 halves their memory (DMD2's SD µreal), netG and µfake stay "
                        "float32; auto = bfloat16 under --mixed-precision bf16, else float32")
    p.add_argument("--report-to", default=None, choices=["tensorboard"], help="also log every stats row and sample grid there (<run-dir>/<out>/tensorboard)")
    p.add_argument("--log-every", type=number(int, 0), default=20, help="status line + stats.jsonl row every N steps")
    p.add_argument("--ckpt-every", type=number(int, 0), default=200, help="save student + training state every N steps")
    p.add_argument("--sample-every", type=number(int, 0), default=200, help="sample grid on fixed seeds every N steps")
    p.add_argument("--probe-every", type=number(int, 0, inclusive=True), default=100,
                   help="quality probe every N steps: FID / accuracy of one-step samples on the features of "
                        "<run-dir>/classifier (made by `evaluate.py --prepare`); the best is kept as student_best; 0 = off")
    p.add_argument("--probe-samples", type=number(int, 3), default=500, help="samples per quality probe (recall's k = 3 needs 4)")
    p.add_argument("--data-dir", default=None, help="dataset folder: the probe's reference images, the GAN's real images "
                                                    "(a text-to-image teacher's: with their captions, metadata.jsonl)")
    p.add_argument("--prompts", default=None,
                   help="a text-to-image teacher: the prompts G is distilled for, one a line (each encoded once by the "
                        "frozen text encoder; guidance is against the empty prompt)")
    p.add_argument("--out", default=DMD,
                   help="this run's folder inside --run-dir, a plain name (the recipe's regression warm start writes "
                        "kd/, the DMD2 run that starts from it, --generator-init <run-dir>/kd/student, writes dmd/)")
    p.add_argument("--lora-rank", type=number(int, 0, inclusive=True), default=0,
                   help="netG and µfake as LoRA adapters of this rank on one shared, frozen copy of the teacher (peft), "
                        "which µreal is: one base network in memory instead of three, and only the adapters trained "
                        "(a text-to-image teacher's memory; docs/BENCHMARKS.md); 0 = full weights")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the networks' activations in the backward pass instead of keeping them: less "
                        "memory, about a third more compute (diffusers' UNets)")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/<out>/train_state.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in <run-dir>/<out>")
    dmd.add_arguments(p)
    args = parse(p)
    if os.path.basename(args.out) != args.out or args.out in ("", ".", "..", TEACHER, PAIRS, EVAL, CLASSIFIER, VAE, LATENTS):
        raise UserError(f"--out {args.out!r}: give a plain folder name other than {TEACHER}, {PAIRS}, {EVAL}, "
                        f"{CLASSIFIER}, {VAE} and {LATENTS} (default {DMD}; the warm start's: kd)")
    if args.dm_weight == 0 and args.gan_weight == 0 and args.reg_weight == 0:
        raise UserError("--dm-weight 0 --gan-weight 0 --reg-weight 0: nothing trains netG; give one of them > 0")
    recipe = PRESETS[args.dataset]
    args.lr = args.lr or recipe["lr"]
    args.lr_fake = args.lr_fake or args.lr
    args.steps = args.steps or recipe["steps"]
    args.teacher = args.teacher or default_teacher(args.dataset, args.run_dir)
    if args.pairs and args.reg_weight == 0:
        raise UserError(f"--pairs {args.pairs} is read only by the regression loss, which --reg-weight 0 (DMD2) turns off: "
                        f"drop --pairs, or give --reg-weight > 0 (DMD: 0.25)")
    args.pairs = (args.pairs or os.path.join(args.run_dir, PAIRS)) if args.reg_weight > 0 else None  # DMD2: no pairs
    saved = os.path.join(args.run_dir, args.out, "config.json")
    if args.guidance == "best" and args.resume and os.path.isfile(saved):  # the run's, not a newer report's
        args.guidance = load_json(saved)["guidance"]
    if args.guidance == "best":  # the teacher at its best, as evaluate.py measured it
        best = required_best_teacher_row(args.run_dir, weights_hash(args.teacher), "--guidance best", "a number")
        args.guidance = best["guidance"]
        print(f"distill: µreal's guidance {args.guidance:g}, that of the teacher's best row {best['model']}")
    if args.guidance is None and args.pairs and os.path.isfile(os.path.join(args.pairs, "meta.json")):
        args.guidance = load_json(os.path.join(args.pairs, "meta.json"))["guidance"]  # µreal must match the pairs'
    if args.guidance not in (None, 1.0) and recipe["num_classes"] == 0:
        raise UserError(f"--guidance {args.guidance} needs a class-conditional teacher; {args.dataset} is unconditional: drop --guidance")
    if args.t_min >= args.t_max or args.t_max > 1:
        raise UserError(f"--t-min {args.t_min} / --t-max {args.t_max}: need 0 <= t-min < t-max <= 1")
    if args.guidance_t_max > 1 or args.guidance_t_max <= args.t_min:
        raise UserError(f"--guidance-t-max {args.guidance_t_max}: a fraction of T above --t-min {args.t_min} and at most 1 "
                        f"(1 = guidance at every t; for none, --guidance 1)")
    if args.gan_t_max > 1:
        raise UserError(f"--gan-t-max {args.gan_t_max}: the GAN's noise range is a fraction of T, at most 1")
    if args.reg_step_inputs == "teacher" and (args.generator_steps == 1 or not dmd.regression_only(args)):
        raise UserError("--reg-step-inputs teacher sets the inputs of a K-step warm start's regression: it needs "
                        "--generator-steps K > 1 and the regression alone (--reg-weight > 0 --dm-weight 0 --gan-weight 0)")
    if args.backward_simulation and args.generator_steps == 1:
        raise UserError("--backward-simulation needs a K-step generator: add --generator-steps K (K > 1; DMD2: 4)")
    if args.lora_rank and args.gradient_checkpointing:
        raise UserError("--gradient-checkpointing recomputes a forward in the backward pass, when the shared base of "
                        "--lora-rank runs another network's adapter: use one of the two")
    if args.lora_rank and (args.ema or args.generator_init):
        raise UserError(f"--lora-rank trains adapters on the teacher itself: {'--ema' if args.ema else '--generator-init'} "
                        f"would need a second full network; drop it")
    if args.divergence != "reverse-kl" and args.generator_loss == "sid":
        raise UserError(f"--divergence {args.divergence} weighs DMD's gradient and --generator-loss sid replaces it: "
                        f"drop --divergence, or use --generator-loss dmd")
    if args.divergence != "reverse-kl" and args.gan_weight == 0:
        raise UserError(f"--divergence {args.divergence} weighs the DM gradient by the density ratio the GAN head "
                        f"estimates, and --gan-weight 0 has no head: add --gan-weight > 0 (the demo: 3e-2), or drop --divergence")
    if args.ratio_min >= args.ratio_max:
        raise UserError(f"--ratio-min {args.ratio_min} / --ratio-max {args.ratio_max}: need ratio-min < ratio-max (f-distill: 0.1, 20)")
    return args


def main():
    args = parse_args()
    out = os.path.join(args.run_dir, args.out)
    check_run_folder(out, args.resume, args.overwrite, "a distillation run")
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available(),  # cpu: real DDP under torchrun
                              log_with=args.report_to, project_dir=out if args.report_to else None)
    world, rank, dev, main_process = (accelerator.num_processes, accelerator.process_index, accelerator.device,
                                      accelerator.is_main_process)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes: pick a multiple of {world}")
    if args.lora_rank and world > 1:
        raise UserError(f"--lora-rank shares one base network between netG and µfake, which {world} data-parallel "
                        f"processes cannot wrap twice: run one process (DMD2's answer for SDXL on several GPUs is FSDP)")

    # --- set-up: the teacher, netG / µreal / µfake, the data, the optimisers (docs/ALGORITHM.md)
    prompts = read_prompts(args.prompts)
    teacher, args.guidance = open_teacher(args.teacher, args.dataset, args.guidance, prompts=prompts)
    cfg = dmd.StepConfig.from_args(args)
    scheduler, vae_out = teacher.schedule.scheduler, teacher.vae and teacher.vae.vae  # the teacher's own, saved with students
    text_out = teacher.text  # a text-to-image teacher's encoder and prompts (the labels)
    frozen = getattr(torch, args.frozen_dtype if args.frozen_dtype != "auto" else
                     "bfloat16" if args.mixed_precision == "bf16" else "float32")
    # the VAE and text encoder the three networks share: the teacher's, or bf16 copies (the float32 ones then stay on
    # the CPU for the students' folders, which ship the teacher's VAE and text encoder as they were)
    vae, text = vae_out, text_out
    if frozen != torch.float32 and vae_out is not None:
        vae = cast_frozen(copy.deepcopy(vae_out), frozen)
    if frozen != torch.float32 and text_out is not None:
        text = copy.deepcopy(text_out)
        for model in text.models:
            cast_frozen(model, frozen)
    if args.gradient_checkpointing:
        enable_checkpointing(teacher.backbone)
    net_g, mu_real, mu_fake = (n.to(dev) for n in make_dmd_networks(teacher.backbone, scheduler, cfg.gan_weight > 0,
                                                                    args.seed, args.gan_head_input, vae, text,
                                                                    args.lora_rank, frozen))
    shape, num_classes, T = mu_real.shape, mu_real.num_classes, mu_real.T  # what the teacher makes (latents: their shape)
    if args.generator_init and not args.resume:
        init_generator(net_g, args.generator_init, weights_hash(args.teacher))
    timesteps = generator_timesteps(T, cfg.generator_steps)  # (refuses a K that does not divide T)
    meta, pairs = read_pairs(args, timesteps, prompts) if args.pairs else ({}, None)
    data_classes = None if text else num_classes  # a text-to-image teacher's labels are prompts, not the data's classes
    real = (load_splits(args.dataset, args.data_dir, main_process, mu_real.image_shape, data_classes)[0]
            if dmd.needs_real_images(cfg) else None)
    check_real_images(args, real)
    if real is not None and text:  # real images with their captions, labels in the text encoder's table after the prompts
        real, captions = captioned(real, args.data_dir)
        caption_labels = text.set_prompts(prompts, captions)  # (each text encoded once)
        real = Relabelled(real, [caption_labels[c] for c in real.labels])
    if real is not None and mu_real.vae:  # a latent teacher's G, µreal and µfake see real images as their latents
        real = real_latents(args, real, mu_real.vae, accelerator)
    # the regression distance (and LPIPS's fallback notice) only where a regression loss runs: DMD2 has none
    reg_fn, reg_used = regression_loss(args.reg_loss, args.huber_c) if args.reg_weight > 0 else (None, "none")
    if reg_used == "lpips" and mu_real.vae:  # LPIPS compares images: a latent teacher's are decoded (with grad) first
        reg_fn = DecodedDistance(reg_fn, mu_real.vae)
    opt_g, opt_fake = (torch.optim.AdamW(net_g.trained_parameters(), lr=args.lr),
                       torch.optim.AdamW(mu_fake.trained_parameters(), lr=args.lr_fake))
    st = TrainState(net_g, mu_fake, opt_g, opt_fake, *(lr_schedule(args, o) for o in (opt_g, opt_fake)),
                    AveragedModel(net_g.backbone, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True)
                    if args.ema else None,
                    torch.Generator().manual_seed(args.seed))  # fresh z, y, t, ε: one global stream on every process
    if args.resume:
        saved = os.path.join(out, "config.json")
        check_same_method(args, load_json(saved) if os.path.exists(saved) else {}, out)
        st.load_state_dict(load_state(os.path.join(out, STATE)))
    net_g_ddp, mu_fake_ddp, st.opt_g, st.opt_fake = accelerator.prepare(net_g, mu_fake, st.opt_g, st.opt_fake)
    nets = dmd.Networks(net_g, mu_real, mu_fake, reg_fn.to(dev) if reg_used == "lpips" else reg_fn, net_g_ddp, mu_fake_ddp)
    real_checksum = checksum(mu_real)  # recorded again at the end: µreal must never change
    config = dict(vars(args), reg_loss_used=reg_used, teacher_hash=weights_hash(args.teacher), num_processes=world,
                  per_process_batch=args.batch_size // world, prediction_type=net_g.prediction_type, T=T,
                  num_classes=num_classes, generator_timesteps=timesteps, pairs_meta=meta, prompts_file=args.prompts,
                  prompts=prompts)
    if reg_used not in (args.reg_loss, "none"):
        config["notice"] = f"LPIPS unavailable: regression loss fell back to {reg_used}"

    # The student this run ships (dmd/pipeline) and its probe keeps (student_best): the EMA of netG when there is one
    shipped, shipped_name = ((Denoiser(st.ema.module, scheduler, vae, text), STUDENT_EMA) if st.ema else (net_g, STUDENT))
    config["exported"] = shipped_name

    # --- what the run shows: sample grids on fixed seeds (one-step before distillation vs G now), the probe
    grids = SampleGrid(mu_real, shape, num_classes, timesteps, dev) if main_process else None
    probe = None
    if main_process and args.probe_every:
        real_train, real_reference, _ = load_splits(args.dataset, args.data_dir, False, mu_real.image_shape, data_classes)
        probe = make_probe(os.path.join(args.run_dir, CLASSIFIER), real_reference, args.probe_samples, PROBE_SEED, shape,
                           num_classes, timesteps, dev, mu_real.decode,
                           prompt_classes(prompts, class_names_of_data(args.dataset, real_train)) if text else None)
        best = best_teacher_row(args.run_dir, config["teacher_hash"])
        if probe is not None and best is not None:  # the gap, read as evaluate.py reads it: against the teacher's best
            probe.set_gap_reference(best["model"], lambda z, y: sample_teacher(mu_real, z, y, best["steps"],
                                                                               best["guidance"]), real_train)
            print(f"probe: gap against {best['model']}, the teacher's best row in {args.run_dir}/{EVAL}/report.json "
                  f"(probe FID {probe.gap_reference['probe_fid']:.2f}, real {probe.gap_reference['real_probe_fid']:.2f})")
    if main_process:
        start_folder(out, args, config, st.step)
    if args.report_to:  # hyperparameters as the tracker takes them: scalars and strings
        accelerator.init_trackers("tensorboard", {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})

    # --- the loop
    t0 = t_log = time.time()
    step_log = st.step  # the step of the last stats row (ms_per_step averages since then)
    last_g = {}  # the latest generator-update numbers, logged at every interval (with --gen-every > 1 too)
    every = 1 if dmd.regression_only(cfg) else cfg.gen_every  # netG's updates: steps 0, k, 2k, ...
    g_updates = -(-st.step // every)  # generator updates so far
    bar = progress(total=args.steps, initial=st.step, desc="dmd", disable=not main_process)
    while st.step < args.steps:
        # one DMD step (dmd.py)
        batch = dmd.draw_batch(st.gen, st.step, cfg, shape, num_classes, T, pairs, real, rank, world, dev)
        try:
            g_stats, last_fake = dmd.dmd_step(st.step, nets, st.opt_g, st.opt_fake, batch, cfg, accelerator)
        except FloatingPointError as e:
            raise UserError(f"{e} at step {st.step}: training diverged; the last good checkpoint is in {out} "
                            f"(resume from it with a lower --lr)")
        if g_stats:
            g_updates += 1
            last_g = dict(g_updates=g_updates, **g_stats, lr_g=st.sched_g.get_last_lr()[0])
            if st.ema:
                st.ema.update_parameters(net_g.backbone)
        st.sched_g.step()  # both lrs are functions of the step (netG's too, though it updates every --gen-every)
        if not dmd.regression_only(cfg):  # (regression alone never updates µfake: its scheduler would warn)
            st.sched_fake.step()
        st.step += 1
        step = st.step
        bar.update(1)

        # the status line and the probe, sample grids, checkpoints: each on its own schedule
        stop = args.max_minutes is not None and time.time() - t0 > args.max_minutes * 60
        stop = bool(accelerator.gather(torch.tensor([stop], device=dev)).any())  # every process stops together
        last = step == args.steps or stop
        probe_now = probe is not None and (step % args.probe_every == 0 or last)
        if main_process and (step % args.log_every == 0 or last or probe_now):
            ms = (time.time() - t_log) * 1000 / (step - step_log)
            t_log, step_log = time.time(), step
            row = dict(step=step, **last_g, **last_fake, ms_per_step=ms, images_per_s=args.batch_size * 1000 / ms,
                       minutes=(time.time() - t0) / 60)
            if probe_now:  # netG, and the EMA when there is one; the shipped student's best is kept
                row.update(probe(net_g))
                if st.ema:
                    row.update({f"{k}_ema": v for k, v in probe(shipped).items()})
                fid = row["probe_fid_ema" if st.ema else "probe_fid"]
                if fid < st.best_probe:  # probe seeds are disjoint from evaluation's: choosing here biases nothing
                    st.best_probe = fid
                    save_student(shipped.standalone(), scheduler, os.path.join(out, STUDENT_BEST), timesteps, vae_out, text_out)
                    write_json(dict(step=step, probe_fid=fid, of=shipped_name), os.path.join(out, STUDENT_BEST, "probe.json"))
            append_jsonl(row, os.path.join(out, "stats.jsonl"))
            bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            accelerator.log(row, step=step)
        if main_process and (step % args.sample_every == 0 or last):
            grids.save(net_g, out, step, accelerator.get_tracker(args.report_to) if args.report_to else None)
        if main_process and (step % args.ckpt_every == 0 or last):
            save_checkpoint(out, st, scheduler, timesteps, vae_out, text_out)
            plot_losses(out)
        if stop:
            break
    bar.close()

    # --- the end: every process must hold the same netG and µfake (data parallelism), recorded so it can be checked
    sums = accelerator.gather(torch.tensor([[checksum(net_g), checksum(mu_fake)]], dtype=torch.float64, device=dev))
    if main_process:
        write_json(dict(steps_done=st.step, rank_checksums=sums.tolist(), wall_minutes=(time.time() - t0) / 60,
                        stopped_by_time=st.step < args.steps, mu_real_checksum=[real_checksum, checksum(mu_real)],
                        best_probe_fid=st.best_probe if probe else None, exported=shipped_name,
                        gap_reference=probe.gap_reference if probe else None),
                   os.path.join(out, "summary.json"))
        save_pipeline(shipped.standalone(), scheduler, os.path.join(out, PIPELINE), timesteps,
                      dict(config, steps_done=st.step), vae_out, text_out)
        print(f"dmd: {st.step} steps in {(time.time() - t0) / 60:.1f} min -> {out}/{shipped_name}, {out}/{PIPELINE} "
              f"(grid: {out}/samples.png, top: one-step before distillation, bottom: after)")
    accelerator.end_training()  # closes the trackers, and the process group: after the last collective (the gather)


@dataclass
class TrainState:
    """What a checkpoint holds and --resume restores: the two trained networks (µfake with its GAN head), their
    optimisers, the EMA of netG, the random stream, the step and the best probe FID so far."""
    net_g: nn.Module
    mu_fake: nn.Module
    opt_g: torch.optim.Optimizer
    opt_fake: torch.optim.Optimizer
    sched_g: torch.optim.lr_scheduler.LRScheduler
    sched_fake: torch.optim.lr_scheduler.LRScheduler
    ema: Optional[AveragedModel]
    gen: torch.Generator
    step: int = 0
    best_probe: float = float("inf")

    def state_dict(self):
        return dict(net_g=self.net_g.trained_state_dict(), mu_fake=self.mu_fake.trained_state_dict(),
                    gan_head=self.mu_fake.head.state_dict() if self.mu_fake.head is not None else {},
                    opt_g=self.opt_g.state_dict(), opt_fake=self.opt_fake.state_dict(),
                    sched_g=self.sched_g.state_dict(), sched_fake=self.sched_fake.state_dict(),
                    ema=self.ema.state_dict() if self.ema else {}, gen=self.gen.get_state(), step=self.step,
                    best_probe=self.best_probe)

    def load_state_dict(self, state):
        self.net_g.load_trained_state_dict(state["net_g"])
        self.mu_fake.load_trained_state_dict(state["mu_fake"])
        if self.mu_fake.head is not None:
            self.mu_fake.head.load_state_dict(state["gan_head"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_fake.load_state_dict(state["opt_fake"])
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_fake.load_state_dict(state["sched_fake"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.gen.set_state(state["gen"])
        self.step, self.best_probe = state["step"], state["best_probe"]


def lr_schedule(args, optimizer):
    """The lr as a function of the step (diffusers' schedules): linear warm-up over --warmup-steps, then constant or
    decayed to 0 at --steps."""
    name = "constant_with_warmup" if args.lr_schedule == "constant" else args.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.steps)


def save_checkpoint(out, st, scheduler, timesteps, vae=None, text=None):
    """The students (diffusers folders) and the training state; main process only."""
    save_student(st.net_g.standalone(), scheduler, os.path.join(out, STUDENT), timesteps, vae, text)
    if st.ema:
        save_student(st.ema.module, scheduler, os.path.join(out, STUDENT_EMA), timesteps, vae, text)
    save_state(st.state_dict(), os.path.join(out, STATE))


class SampleGrid:
    """Sample grids on fixed seeds: the one-step teacher before distillation (top rows) vs the generator now (bottom
    rows), saved as samples/step_N.png and samples.png (and to the tracker, if any)."""

    def __init__(self, mu_real, shape, num_classes, timesteps, dev):
        self.nrow, self.timesteps = grid_columns(num_classes), timesteps
        self.noise = seeded_noise(range(self.nrow * 2), shape, GRID_SEED, len(timesteps)).to(dev)
        y = balanced_labels(range(self.nrow * 2), num_classes)
        self.y = y.to(dev) if y is not None else None
        self.decode = mu_real.decode  # a latent teacher's images
        with torch.no_grad():
            self.before = self.decode(sample_generator(mu_real, self.noise, self.y, timesteps[:1])).cpu()

    @torch.no_grad()
    def save(self, net_g, out, step, tracker=None):
        grid = torch.cat([self.before, self.decode(sample_generator(net_g, self.noise, self.y, self.timesteps)).cpu()])
        save_grid(grid, os.path.join(out, "samples", f"step_{step:06d}.png"), nrow=self.nrow)
        save_grid(grid, os.path.join(out, "samples.png"), nrow=self.nrow)
        if tracker is not None:
            tracker.log_images({"samples (top: before, bottom: now)":
                                make_grid(grid.clamp(-1, 1).add(1).div(2), nrow=self.nrow)[None]}, step)


def start_folder(out, args, config, step):
    """The run folder as this run starts: emptied with --overwrite, the config written, stats after `step` (the
    checkpoint resumed from) dropped, the summary removed until this run ends."""
    if args.overwrite and not args.resume:
        shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    write_json(config, os.path.join(out, "config.json"))
    print("config:", json.dumps({k: v for k, v in config.items() if k != "pairs_meta"}, default=str))
    truncate_jsonl(os.path.join(out, "stats.jsonl"), step)
    if os.path.exists(os.path.join(out, "summary.json")):
        os.remove(os.path.join(out, "summary.json"))


def real_latents(args, real, vae, accelerator):
    """The real images as a latent teacher's latents (with their labels), encoded once by the main process and
    cached in <run-dir>/latents/ (data.encoded_dataset): the GAN head and the K-step inputs read a batch of them at
    every step."""
    dtype = "" if vae.vae.dtype == torch.float32 else f"-{str(vae.vae.dtype).split('.')[-1]}"  # --frozen-dtype's encodes
    cache = os.path.join(args.run_dir, LATENTS, f"{weights_hash(os.path.join(args.teacher, 'vae'))}-"
                                                f"{args.dataset}-{len(real)}{dtype}.safetensors")
    if accelerator.is_main_process:
        encoded_dataset(real, vae, cache)
    accelerator.wait_for_everyone()
    return encoded_dataset(real, vae, cache)


class DecodedDistance(nn.Module):
    """A distance between images (LPIPS), taken between the images a latent teacher's VAE decodes two latents to,
    with gradient through the decoder into the generator's latents."""

    def __init__(self, distance, vae):
        super().__init__()
        self.distance, self.vae = distance, vae

    def forward(self, x, x_ref):
        with torch.no_grad():
            images_ref = self.vae.decode(x_ref)
        return self.distance(self.vae.decode(x), images_ref)


def check_real_images(args, real):
    """The real-image batch needs that many images."""
    if real is not None and len(real) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(real)} real training images: "
                        f"use a smaller batch or more images")


def check_same_method(args, saved, out):
    """--resume continues the run in `out`: the networks, their optimisers, the generator's loss and µreal's score
    must be the ones it saved."""
    for flag, now, then in (("--gan-weight > 0", args.gan_weight > 0, saved.get("gan_weight", 0) > 0),
                            ("--generator-loss", args.generator_loss, saved.get("generator_loss", "dmd")),
                            ("--generator-steps", args.generator_steps, saved.get("generator_steps", 1)),
                            ("--gan-head-input", args.gan_head_input, saved.get("gan_head_input", "bottleneck")),
                            ("--gan-features", args.gan_features, saved.get("gan_features", "fake")),
                            ("--ema > 0", args.ema > 0, saved.get("ema", 0) > 0),
                            ("--lora-rank", args.lora_rank, saved.get("lora_rank", 0)),
                            ("--guidance-t-max", args.guidance_t_max, saved.get("guidance_t_max", 1.0)),
                            ("--dm-shift", args.dm_shift, saved.get("dm_shift", 1.0)),
                            ("--reg-step-inputs", args.reg_step_inputs, saved.get("reg_step_inputs", "noised"))):
        if now != then:
            raise UserError(f"cannot --resume {out} with {flag} = {now}: it was made with {then}; "
                            f"resume with its flags (config.json) or start again with --overwrite")


def read_pairs(args, timesteps, prompts=None):
    """The pairs' meta and (noise, image, labels, states), after checking they were made by this teacher with this
    guidance (and, for --reg-step-inputs teacher, with the states at this K-step generator's timesteps)."""
    meta, z_pairs, x_pairs, y_pairs, s_pairs = load_pairs(args.pairs)
    teacher_hash = weights_hash(args.teacher)
    if meta["teacher_hash"] != teacher_hash:
        raise UserError(f"pairs in {args.pairs} were made by another teacher ({meta['teacher']}, hash {meta['teacher_hash']}; "
                        f"this one is {teacher_hash}): rerun `python precompute.py --overwrite` with this teacher")
    if meta["guidance"] != args.guidance and args.dm_weight > 0:  # regression alone reads no µreal
        raise UserError(f"pairs in {args.pairs} were made with guidance {meta['guidance']}, µreal would use {args.guidance}: "
                        f"pass --guidance {meta['guidance']} or remake the pairs")
    made = meta.get("guidance_t_max", 1.0)  # pairs from before the flag: guided at every step
    if made != args.guidance_t_max and args.dm_weight > 0:
        raise UserError(f"pairs in {args.pairs} were guided at t <= {made:g} x T, µreal would be at t <= "
                        f"{args.guidance_t_max:g} x T: pass --guidance-t-max {made:g} or remake the pairs with "
                        f"precompute.py --guidance-t-max {args.guidance_t_max:g}")
    if meta.get("prompts") != prompts:  # the pairs' labels are indices into their own prompts
        raise UserError(f"pairs in {args.pairs} were made for {len(meta.get('prompts') or [])} prompts, not these "
                        f"{len(prompts or [])} (--prompts): pass the pairs' prompts, or remake the pairs with "
                        f"precompute.py --prompts")
    if args.reg_step_inputs == "teacher":
        wanted = timesteps[1:]  # the states feed steps 1..K-1
        if meta.get("state_timesteps") != wanted:
            raise UserError(f"--reg-step-inputs teacher needs the teacher's states at timesteps {wanted} with the pairs; "
                            f"{args.pairs} has {meta.get('state_timesteps') or 'none'}: remake them with the settings of "
                            f"its meta.json (DDIM-{meta['sampling_steps']}, guidance {meta['guidance']:g}, a multiple of "
                            f"{args.generator_steps} steps) and `precompute.py --generator-steps {args.generator_steps} --overwrite`")
    if len(z_pairs) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(z_pairs)} pairs: use a smaller batch or more pairs")
    return meta, (z_pairs, x_pairs, y_pairs, s_pairs if args.reg_step_inputs == "teacher" else None)


def init_generator(net_g, folder, teacher_hash):
    """netG's weights from a student that distill.py made from this very teacher (its run's config.json says so)."""
    record = os.path.join(folder, os.pardir, "config.json")
    made_from = load_json(record).get("teacher_hash") if os.path.isfile(record) else None
    if made_from != teacher_hash:
        raise UserError(f"--generator-init {folder} was not distilled from this teacher (its run's config.json names "
                        f"{made_from}, this teacher is {teacher_hash}): pass <run-dir>/kd/student of a run on this teacher")
    net_g.backbone.load_state_dict(load_teacher(folder)[0].state_dict())


def enable_checkpointing(backbone):
    """--gradient-checkpointing, diffusers' own; one line for a backbone without it."""
    try:
        backbone.enable_gradient_checkpointing()
    except (ValueError, AttributeError) as e:
        raise UserError(f"--gradient-checkpointing: {type(backbone).__name__} has none ({str(e)[:80]}): drop the flag")


def checksum(module):
    """A number that changes when the weights do (a shared base's LoRA adapters left out: µreal is the base)."""
    return sum(p.double().sum().item() for k, p in module.state_dict().items() if p.is_floating_point() and "lora_" not in k)


def plot_losses(out):
    """loss-curve PNG from stats.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not os.path.exists(os.path.join(out, "stats.jsonl")):  # a checkpoint before the first log line
        return
    with open(os.path.join(out, "stats.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    keys = [k for k in ("loss_dm", "loss_sid", "loss_reg", "loss_gan", "loss_fake", "loss_disc", "d_real", "d_fake", "w", "grad_g",
                        "grad_fake", "lr_g", "r_mean", "h_max", "probe_fid", "probe_fid_ema", "probe_recall", "probe_gap") if any(r.get(k) for r in rows)]
    # (a term that is off, as loss_reg in DMD2, logs all zeros: no panel for it)
    cols = math.ceil(math.sqrt(len(keys)))  # a grid about as wide as tall, each panel readable at 100%
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(3.2 * cols, 2.5 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, keys):
        ax.plot([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r])
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    with atomic(os.path.join(out, "loss_curves.png")) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


if __name__ == "__main__":
    keep_freed_memory()  # CPU speed (cli.keep_freed_memory)
    run(main)
