"""Distribution Matching Distillation: train a one-step generator G(z, y) from a multi-step teacher.

    python distill.py --lr 5e-6                      # reads runs/mnist/{teacher,pairs}, writes runs/mnist/dmd
    accelerate launch distill.py --mixed-precision bf16 --dataset cifar10

Each step (DESIGN.md, "The algorithm, exactly"): x = G(z, y) on fresh noise and labels; the DM loss from
µreal (frozen teacher, guided) and µfake (trained on G's images) at a random t; the regression loss of G
on a batch of precomputed pairs; netG updated every --gen-every steps, µfake every step.
"""
import json
import os
import shutil
import sys
import time

import torch
from accelerate import Accelerator
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from tqdm import tqdm

from data import load_dataset, load_pairs, save_grid, to_uint8, to_unit
from losses import denoising_loss, dm_loss, dm_timesteps, regression_loss
from models import (DATASETS, Classifier, balanced_labels, check_image_shape, default_teacher, die, finish_args, load_state,
                    load_teacher, make_dmd_networks, number, one_step, save_state, save_teacher, script_parser,
                    seeded_noise, weights_hash, write_json)

SEED_LR = {"mnist": 5e-6, "celeba": 5e-6, "cifar10": 1e-6}  # the seed's table
SEED_STEPS = {"mnist": 2000, "celeba": 2000, "cifar10": 1520}


def main():
    p = script_parser(__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher folder or hub id; default <run-dir>/teacher (CIFAR-10: the hub id)")
    p.add_argument("--pairs", default=None, help="precomputed pairs folder; default <run-dir>/pairs")
    p.add_argument("--lr", type=number(float, 0), default=None, help="netG learning rate (seed: 5e-6 MNIST/CelebA, 1e-6 CIFAR-10)")
    p.add_argument("--lr-fake", type=number(float, 0), default=None, help="µfake learning rate; default --lr")
    p.add_argument("--batch-size", type=number(int, 0), default=64, help="global batch of fresh noise, and of pairs (seed: 64)")
    p.add_argument("--steps", type=number(int, 0), default=None, help="training steps (seed: 2000 MNIST/CelebA, 1520 CIFAR-10)")
    p.add_argument("--max-minutes", type=number(float, 0), default=None, help="also stop after this much wall time (demo budget)")
    p.add_argument("--dm-weight", type=number(float, 0, inclusive=True), default=1.0, help="weight of the DM loss (0 = regression only, for ablations)")
    p.add_argument("--reg-weight", type=number(float, 0, inclusive=True), default=0.25, help="λ_reg on the regression loss (seed's α: 0.25)")
    p.add_argument("--reg-loss", default="lpips", choices=["lpips", "pseudo_huber", "l2"], help="regression distance (LPIPS at 224 as DMD)")
    p.add_argument("--huber-c", type=number(float, 0), default=0.03, help="pseudo-Huber c (on the per-pixel RMS scale)")
    p.add_argument("--gen-every", type=number(int, 0), default=1, help="netG update every N steps (1 = DMD, 5 = DMD2's two time-scale rule)")
    p.add_argument("--guidance", type=number(float, 0, inclusive=True), default=None, help="µreal's guidance scale; must match the pairs'")
    p.add_argument("--t-min", type=number(float, 0, inclusive=True), default=0.02, help="DM loss t range, as a fraction of T (DMD2: 0.02)")
    p.add_argument("--t-max", type=number(float, 0), default=0.98, help="DM loss t range upper end (DMD2: 0.98)")
    p.add_argument("--fake-loss", default="native", choices=["native", "x0"], help="µfake objective: the teacher's own (ε or v) or the seed's x̂0 form")
    p.add_argument("--ema", type=number(float, 0, inclusive=True), default=0.0, help="EMA decay of netG, saved as student_ema (0 = off)")
    p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="max gradient norm, both networks")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="autocast (bf16 recommended on GPU; DMD2 saw fp16 diverge)")
    p.add_argument("--log-every", type=number(int, 0), default=20, help="status line + stats.jsonl row every N steps")
    p.add_argument("--ckpt-every", type=number(int, 0), default=200, help="save student + training state every N steps")
    p.add_argument("--sample-every", type=number(int, 0), default=200, help="sample grid on fixed seeds every N steps")
    p.add_argument("--probe-every", type=number(int, 0, inclusive=True), default=100,
                   help="quality probe every N steps: FID / accuracy of one-step samples on the features of "
                        "<run-dir>/classifier (made by `evaluate.py --prepare`); 0 = off")
    p.add_argument("--probe-samples", type=number(int, 0), default=500, help="samples per quality probe")
    p.add_argument("--data-dir", default=None, help="dataset folder for the probe's real reference images")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/dmd/train_state.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in <run-dir>/dmd")
    args = finish_args(p.parse_args())
    spec = DATASETS[args.dataset]
    args.lr = args.lr or SEED_LR[args.dataset]
    args.lr_fake = args.lr_fake or args.lr
    args.steps = args.steps or SEED_STEPS[args.dataset]
    args.teacher = args.teacher or default_teacher(args.dataset, args.run_dir)
    args.pairs = args.pairs or os.path.join(args.run_dir, "pairs")
    if args.guidance is None:
        args.guidance = 2.0 if spec["num_classes"] else 1.0
    if args.guidance != 1.0 and not spec["num_classes"]:
        die(f"--guidance {args.guidance} needs a class-conditional teacher; {args.dataset} is unconditional: drop --guidance")
    if args.t_min >= args.t_max or args.t_max > 1:
        die(f"--t-min {args.t_min} / --t-max {args.t_max}: need 0 <= t-min < t-max <= 1")
    out = os.path.join(args.run_dir, "dmd")
    state_path = os.path.join(out, "train_state.pt")
    if os.path.exists(state_path) and not (args.resume or args.overwrite):
        die(f"{out} holds a distillation run: pass --resume to continue it (e.g. with more --steps), --overwrite to "
            f"start again, or another --run-dir")
    if args.resume and not os.path.exists(state_path):
        die(f"--resume: no {state_path} to resume from; drop --resume to start a new run")

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())  # cpu: real DDP under torchrun
    world, rank, dev = accelerator.num_processes, accelerator.process_index, accelerator.device
    if args.batch_size % world:
        die(f"--batch-size {args.batch_size} is not divisible by the {world} processes: pick a multiple of {world}")
    B = args.batch_size // world  # per process
    backbone, scheduler = load_teacher(args.teacher)
    check_image_shape(backbone, args.dataset, args.teacher)
    meta, z_pairs, x_pairs, y_pairs = load_pairs(args.pairs)
    teacher_hash = weights_hash(args.teacher)
    if meta["teacher_hash"] != teacher_hash:
        die(f"pairs in {args.pairs} were made by another teacher ({meta['teacher']}, hash {meta['teacher_hash']}; "
            f"this one is {teacher_hash}): rerun `python precompute.py --overwrite` with this teacher")
    if meta["guidance"] != args.guidance:
        die(f"pairs in {args.pairs} were made with guidance {meta['guidance']}, µreal would use {args.guidance}: "
            f"pass --guidance {meta['guidance']} or remake the pairs")
    steps_per_epoch = len(z_pairs) // args.batch_size
    if steps_per_epoch == 0:
        die(f"--batch-size {args.batch_size} is larger than the {len(z_pairs)} pairs: use a smaller batch or more pairs")

    net_g, mu_real, mu_fake = make_dmd_networks(backbone, scheduler)
    net_g, mu_real, mu_fake = net_g.to(dev), mu_real.to(dev), mu_fake.to(dev)
    reg_fn, reg_used = regression_loss(args.reg_loss, args.huber_c)
    if reg_used == "lpips":
        reg_fn = reg_fn.to(dev)
    opt_g = torch.optim.AdamW(net_g.parameters(), lr=args.lr)
    opt_fake = torch.optim.AdamW(mu_fake.parameters(), lr=args.lr_fake)
    ema = AveragedModel(net_g.backbone, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    gen = torch.Generator().manual_seed(args.seed)  # fresh z, y, t, ε: the same global stream on every process
    step = 0
    if args.resume:
        state = load_state(state_path)
        net_g.backbone.load_state_dict(state["net_g"])
        mu_fake.backbone.load_state_dict(state["mu_fake"])
        opt_g.load_state_dict(state["opt_g"])
        opt_fake.load_state_dict(state["opt_fake"])
        if ema:
            ema.load_state_dict(state["ema"])
        gen.set_state(state["gen"])
        step = state["step"]
    net_g_w, mu_fake_w, opt_g, opt_fake = accelerator.prepare(net_g, mu_fake, opt_g, opt_fake)
    T = net_g.T
    real_checksum = checksum(mu_real)  # recorded again at the end: µreal must never change
    config = dict(vars(args), reg_loss_used=reg_used, teacher_hash=teacher_hash, num_processes=world,
                  per_process_batch=B, prediction_type=net_g.prediction_type, T=T, pairs_meta=meta)
    if reg_used != args.reg_loss:
        config["notice"] = f"LPIPS unavailable: regression loss fell back to {reg_used}"

    # Fixed seeds for the sample grids: one-step before distillation (top) vs now (bottom).
    n_grid = 10 if spec["num_classes"] else 8
    z_grid = seeded_noise(range(n_grid * 2), spec["shape"], 10 ** 6).to(dev)
    y_grid = balanced_labels(range(n_grid * 2), spec["num_classes"])
    y_grid = y_grid.to(dev) if y_grid is not None else None
    with torch.no_grad():
        before = one_step(mu_real, z_grid, y_grid).cpu()

    probe = make_probe(args, spec, dev) if accelerator.is_main_process and args.probe_every else None
    if accelerator.is_main_process:
        if args.overwrite and not args.resume:
            shutil.rmtree(out, ignore_errors=True)
        os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        write_json(config, os.path.join(out, "config.json"))
        print("config:", json.dumps({k: v for k, v in config.items() if k != "pairs_meta"}, default=str))
        truncate_stats(os.path.join(out, "stats.jsonl"), step)  # drop rows logged after the checkpoint we resume from
        if os.path.exists(os.path.join(out, "summary.json")):
            os.remove(os.path.join(out, "summary.json"))  # written again when this run ends

    def G(z, y):
        """One network evaluation: x̂0 of netG at t = T-1 from x_t = z (through the DDP wrapper for grad sync)."""
        return net_g.to_x0(z, T - 1, net_g_w(z, T - 1, y))

    def save_all():
        """Student (diffusers format) and the training state; main process only."""
        if not accelerator.is_main_process:
            return
        save_teacher(net_g.backbone, scheduler, os.path.join(out, "student"))
        if ema:
            save_teacher(ema.module, scheduler, os.path.join(out, "student_ema"))
        save_state(dict(net_g=net_g.backbone.state_dict(), mu_fake=mu_fake.backbone.state_dict(),
                        opt_g=opt_g.state_dict(), opt_fake=opt_fake.state_dict(), ema=ema.state_dict() if ema else {},
                        gen=gen.get_state(), step=step), state_path)

    t0 = t_log = time.time()
    step_log = step  # the step of the last stats row (ms_per_step averages since then)
    perm = None
    last_g = {}  # the latest generator-step numbers, logged at every interval (with --gen-every > 1 too)
    g_updates = -(-step // args.gen_every)  # generator updates so far (steps 0, k, 2k, ... update netG)
    bar = tqdm(total=args.steps, initial=step, desc="dmd", disable=not accelerator.is_main_process)
    while step < args.steps:
        # --- batches. Every process draws the same global batch and keeps its slice [rank::world], so N processes
        # with batch B/N train exactly as one process with batch B. Pairs: a per-epoch permutation (resumable).
        Bg, mine = args.batch_size, slice(rank, None, world)
        z = torch.randn((Bg, *spec["shape"]), generator=gen)[mine].to(dev)
        y = torch.randint(0, spec["num_classes"], (Bg,), generator=gen)[mine].to(dev) if spec["num_classes"] else None
        t_dm = dm_timesteps(Bg, T, gen, args.t_min, args.t_max)[mine].to(dev)
        eps_dm = torch.randn((Bg, *spec["shape"]), generator=gen)[mine].to(dev)
        t_fake = torch.randint(0, T, (Bg,), generator=gen)[mine].to(dev)
        eps_fake = torch.randn((Bg, *spec["shape"]), generator=gen)[mine].to(dev)
        epoch, offset = divmod(step, steps_per_epoch)
        if offset == 0 or perm is None:  # a new permutation per epoch, a function of (seed, epoch)
            perm = torch.randperm(len(z_pairs), generator=torch.Generator().manual_seed(args.seed + epoch))
        idx = perm[offset * Bg:(offset + 1) * Bg][mine]
        z_ref, x_ref = z_pairs[idx].to(dev), x_pairs[idx].to(dev)
        y_ref = y_pairs[idx].to(dev) if y_pairs is not None else None
        gen_step = step % args.gen_every == 0

        # --- generator update: loss_G = loss_DM + λ_reg loss_reg (--dm-weight scales loss_DM for ablations only)
        with accelerator.autocast(), torch.set_grad_enabled(gen_step):
            if gen_step:
                x_all = G(torch.cat([z, z_ref]), torch.cat([y, y_ref]) if y is not None else None)  # one forward
                x, x_reg = x_all[:B], x_all[B:]
                x_t = net_g.add_noise(x.detach(), eps_dm, t_dm)
                with torch.no_grad():
                    p_real = mu_real.x0(x_t, t_dm, y, args.guidance)
                    p_fake = mu_fake.x0(x_t, t_dm, y)
                loss_dm, w = dm_loss(x.float(), p_real.float(), p_fake.float())
                loss_reg = reg_fn(x_reg.float(), x_ref.float())
                loss_g = args.dm_weight * loss_dm + args.reg_weight * loss_reg
                check_finite(step, loss_g=loss_g, loss_dm=loss_dm, loss_reg=loss_reg, out=out)
                accelerator.backward(loss_g)
                g_updates += 1
                last_g = dict(g_updates=g_updates, loss_dm=loss_dm.item(), loss_reg=loss_reg.item(), loss_g=loss_g.item(),
                              w=w.mean().item(), grad_g=accelerator.clip_grad_norm_(net_g_w.parameters(), args.grad_clip).item())
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
                if ema:
                    ema.update_parameters(net_g.backbone)
            else:
                x = G(z, y)

        # --- fake score update: the teacher's denoising objective on G's images (never guided)
        with accelerator.autocast():
            x0 = x.detach()
            x_t = mu_fake.add_noise(x0, eps_fake, t_fake)
            raw = mu_fake_w(x_t, t_fake, y)
            loss_fake = denoising_loss(raw, mu_fake.target(x0, eps_fake, t_fake), mu_fake.to_x0(x_t, t_fake, raw), x0,
                                       args.fake_loss)
        check_finite(step, loss_fake=loss_fake, out=out)
        accelerator.backward(loss_fake)
        last_fake = dict(loss_fake=loss_fake.item(),
                         grad_fake=accelerator.clip_grad_norm_(mu_fake_w.parameters(), args.grad_clip).item())
        opt_fake.step()
        opt_fake.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        stop = args.max_minutes is not None and time.time() - t0 > args.max_minutes * 60
        stop = bool(accelerator.gather(torch.tensor([stop], device=dev)).any())  # every process stops together
        last = step == args.steps or stop
        probe_now = probe is not None and (step % args.probe_every == 0 or last)  # on its own schedule
        if accelerator.is_main_process and (step % args.log_every == 0 or last or probe_now):
            ms = (time.time() - t_log) * 1000 / (step - step_log)
            t_log, step_log = time.time(), step
            row = dict(step=step, **last_g, **last_fake, ms_per_step=ms, images_per_s=args.batch_size * 1000 / ms,
                       minutes=(time.time() - t0) / 60)
            if probe_now:
                row.update(probe(net_g))
            with open(os.path.join(out, "stats.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if step % args.sample_every == 0 or last:
            if accelerator.is_main_process:
                with torch.no_grad():
                    now = one_step(net_g, z_grid, y_grid).cpu()
                save_grid(torch.cat([before, now]), os.path.join(out, "samples", f"step_{step:06d}.png"), nrow=n_grid)
                save_grid(torch.cat([before, now]), os.path.join(out, "samples.png"), nrow=n_grid)
        if step % args.ckpt_every == 0 or last:
            save_all()
            if accelerator.is_main_process:
                plot_losses(out)
        if stop:
            break
    bar.close()
    # Every process must hold the same netG and µfake (data parallelism); recorded so it can be checked.
    sums = accelerator.gather(torch.tensor([[checksum(net_g), checksum(mu_fake)]], dtype=torch.float64, device=dev))
    if accelerator.is_main_process:
        write_json(dict(steps_done=step, rank_checksums=sums.tolist(), wall_minutes=(time.time() - t0) / 60, stopped_by_time=step < args.steps,
                        mu_real_checksum=[real_checksum, checksum(mu_real)]), os.path.join(out, "summary.json"))
        print(f"dmd: {step} steps in {(time.time() - t0) / 60:.1f} min -> {out}/student "
              f"(grid: {out}/samples.png, top: one-step before distillation, bottom: after)")


def make_probe(args, spec, dev):
    """A cheap quality probe, or None where evaluate.py has not made the feature classifier yet: FID of
    --probe-samples one-step images (fixed seeds) against the real test images, on the classifier's features."""
    folder = os.path.join(args.run_dir, "classifier")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        print(f"notice: no {folder}; quality probe off (make it with `python evaluate.py --prepare`)", file=sys.stderr)
        return None
    clf = Classifier.from_pretrained(folder).eval().to(dev)
    real = load_dataset(args.dataset, args.data_dir, train=False, verbose=False)
    with torch.no_grad():
        x_real = torch.stack([real[i][0] for i in range(min(len(real), 10000))]).to(dev)
        ref = fid_features_to_statistics(torch.cat([clf(c)[0] for c in x_real.split(500)]).cpu().double())
    z = seeded_noise(range(args.probe_samples), spec["shape"], 2 * 10 ** 6).to(dev)
    y = balanced_labels(range(args.probe_samples), spec["num_classes"])

    @torch.no_grad()
    def probe(net_g):
        x = torch.cat([one_step(net_g, zc, yc.to(dev) if yc is not None else None)
                       for zc, yc in zip(z.split(250), y.split(250) if y is not None else [None] * len(z.split(250)))])
        f, logits = clf(to_unit(to_uint8(x)))  # the images as saved: clipped to [-1, 1] and quantised, as evaluate.py sees them
        fid = fid_statistics_to_metric(fid_features_to_statistics(f.cpu().double()), ref, False)["frechet_inception_distance"]
        acc = (logits.argmax(1).cpu() == y).float().mean().item() if y is not None else None
        return dict(probe_fid=float(fid), **({"probe_acc": acc} if acc is not None else {}))
    return probe


def truncate_stats(path, step):
    if os.path.exists(path):
        with open(path) as f:
            rows = [line for line in f if json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(rows)
        os.replace(path + ".tmp", path)


def checksum(module):
    return sum(p.double().sum().item() for p in module.state_dict().values() if p.is_floating_point())


def check_finite(step, out, **losses):
    for name, value in losses.items():
        if not torch.isfinite(value):
            die(f"{name} is {value.item()} at step {step}: training diverged; the last good checkpoint is in {out} "
                f"(resume from it with a lower --lr)")


def plot_losses(out):
    """loss-curve PNG from stats.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not os.path.exists(os.path.join(out, "stats.jsonl")):  # a checkpoint before the first log line
        return
    with open(os.path.join(out, "stats.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    keys = [k for k in ("loss_dm", "loss_reg", "loss_fake", "w", "grad_g", "grad_fake", "probe_fid") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6))
    for ax, k in zip(axes, keys):
        ax.plot([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_curves.tmp.png"))
    plt.close(fig)
    os.replace(os.path.join(out, "loss_curves.tmp.png"), os.path.join(out, "loss_curves.png"))


if __name__ == "__main__":
    main()
