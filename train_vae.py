"""Train a small VAE (diffusers AutoencoderKL) on a dataset: the autoencoder of a latent teacher, where no pretrained
one fits (MNIST-sized images; SD's VAE is made for 512x512 RGB).

    python train_vae.py --dataset fashion-mnist     # runs/fashion-mnist/vae: 28x28x1 images <-> 4x14x14 latents
    python train_teacher.py --dataset fashion-mnist --vae runs/fashion-mnist/vae    # a latent teacher on its latents

The loss is that of LDM's KL autoencoders without their perceptual and GAN terms (LPIPS's trunk cannot be downloaded
everywhere): L1 reconstruction + --kl-weight KL(q(z|x) || N(0, I)), per pixel and per latent. At the end the latents'
std over training images sets the config's scaling_factor (SD's convention: the teacher's noise schedule assumes
latents of unit variance, x_T = z ~ N(0, I)).
Writes <run-dir>/vae/ (config.json + weights), train_config.json, reconstructions.png (rows: real, decoded), with
train_state.pt while training, for --resume.
"""
import os
import time

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler

from cli import UserError, keep_freed_memory, number, parse, progress, run, script_parser
from data import load_splits, save_grid
from files import STATE, VAE, check_run_folder, load_state, save_folder, save_state, write_json
from recipes import PRESETS


def main():
    p = script_parser(__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="dataset folder, as for train_teacher.py")
    p.add_argument("--image-size", type=number(int, 0), default=None, help="your own images (--data-dir, no --dataset): their square size")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None, help="your own images: grey (1) or RGB (3); default 3")
    p.add_argument("--latent-channels", type=number(int, 0), default=4, help="channels of a latent (SD: 4)")
    p.add_argument("--block-out-channels", type=lambda s: [number(int, 0)(c) for c in s.split(",")], default=[16, 32],
                   help="encoder / decoder widths, one per level; each level but the first halves the size (16,32: "
                        "28x28 -> 14x14; SD: 128,256,512,512, 8x)")
    p.add_argument("--layers-per-block", type=number(int, 0), default=1, help="resnet blocks per level (SD: 2)")
    p.add_argument("--kl-weight", type=number(float, 0, inclusive=True), default=1e-4,
                   help="weight of the KL term per latent against L1 per pixel: larger pulls the posterior toward "
                        "N(0, I) (smoother latents), smaller keeps finer detail")
    p.add_argument("--batch-size", type=number(int, 0), default=64, help="global batch")
    p.add_argument("--lr", type=number(float, 0), default=2e-3, help="AdamW learning rate")
    p.add_argument("--max-steps", type=number(int, 0), default=600, help="training steps (Fashion-MNIST: 26 dB held-out PSNR at 600)")
    p.add_argument("--warmup-steps", type=number(int, 0, inclusive=True), default=50, help="linear lr warm-up steps")
    p.add_argument("--log-every", type=number(int, 0), default=100, help="status line every N steps")
    p.add_argument("--ckpt-every", type=number(int, 0), default=500, help="save the training state every N steps")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/vae/train_state.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a finished VAE in <run-dir>/vae/")
    args = parse(p)
    spec = PRESETS[args.dataset]
    if spec["shape"] and (args.image_size or args.channels):
        raise UserError(f"--image-size and --channels are for your own images, but {args.dataset} is "
                        f"{'x'.join(map(str, spec['shape']))}: drop them, or drop --dataset to train on --data-dir images")
    if not spec["shape"] and not args.image_size:
        raise UserError("your own images need --image-size (and --data-dir): the square size the VAE encodes")
    shape = spec["shape"] or (args.channels or 3, args.image_size, args.image_size)
    factor = 2 ** (len(args.block_out_channels) - 1)
    if shape[-1] % factor:
        raise UserError(f"--block-out-channels {','.join(map(str, args.block_out_channels))} halves the size "
                        f"{len(args.block_out_channels) - 1} times, which {shape[-1]} px does not divide into: use fewer levels")
    out = os.path.join(args.run_dir, VAE)
    state_path = os.path.join(out, STATE)
    check_run_folder(out, args.resume, args.overwrite, "a VAE", finished="train_config.json")

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu: real DDP under torchrun
    world, rank, dev = accelerator.num_processes, accelerator.process_index, accelerator.device
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes: pick a multiple of {world}")
    train, held_out, _ = load_splits(args.dataset, args.data_dir, accelerator.is_main_process, shape)
    if len(train) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(train)} training images: use a smaller batch")
    torch.manual_seed(args.seed)  # the initial weights
    c = len(args.block_out_channels)
    vae = AutoencoderKL(in_channels=shape[0], out_channels=shape[0], latent_channels=args.latent_channels,
                        block_out_channels=args.block_out_channels, layers_per_block=args.layers_per_block,
                        down_block_types=("DownEncoderBlock2D",) * c, up_block_types=("UpDecoderBlock2D",) * c,
                        norm_num_groups=min(32, *args.block_out_channels), sample_size=shape[-1]).to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    lr_sched = get_scheduler("cosine", opt, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps)
    gen = torch.Generator().manual_seed(args.seed)  # batches and the posterior's noise: one global stream
    step = 0
    if args.resume:
        state = load_state(state_path)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr_sched"])
        gen.set_state(state["gen"])
        step = state["step"]
    model, opt = accelerator.prepare(vae, opt)
    latent_shape = (args.latent_channels, shape[1] // factor, shape[2] // factor)
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        print(f"vae: {sum(p.numel() for p in vae.parameters()):,} parameters, {'x'.join(map(str, shape))} images <-> "
              f"{'x'.join(map(str, latent_shape))} latents")

    t0, t_log, Bg, mine = time.time(), time.time(), args.batch_size, slice(rank, None, world)
    bar = progress(total=args.max_steps, initial=step, desc="vae", disable=not accelerator.is_main_process)
    while step < args.max_steps:
        idx = torch.randint(0, len(train), (Bg,), generator=gen)[mine]
        eps = torch.randn((Bg, *latent_shape), generator=gen)[mine].to(dev)
        x = torch.stack([train[int(i)][0] for i in idx]).to(dev)
        posterior = model.encode(x).latent_dist
        x_rec = model.decode(posterior.mean + posterior.std * eps).sample  # z ~ q(z|x), reparameterised
        rec = (x_rec - x).abs().mean()
        kl = 0.5 * (posterior.mean ** 2 + posterior.var - 1 - posterior.logvar).mean()
        loss = rec + args.kl_weight * kl
        if not torch.isfinite(loss):
            raise UserError(f"loss is {loss.item()} at step {step}: lower --lr; the last good state is in {out}")
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if accelerator.is_main_process and step % args.log_every == 0:
            bar.write(f"step {step:6d} | l1 {rec.item():.4f} | kl {kl.item():.3f} | lr {lr_sched.get_last_lr()[0]:.2e} | "
                      f"{(time.time() - t_log) / args.log_every * 1000:.0f} ms/step")
            t_log = time.time()
        if accelerator.is_main_process and (step % args.ckpt_every == 0 or step == args.max_steps):
            save_state(dict(model=vae.state_dict(), opt=opt.state_dict(), lr_sched=lr_sched.state_dict(),
                            gen=gen.get_state(), step=step), state_path)
    bar.close()

    if accelerator.is_main_process:
        vae.eval()
        with torch.no_grad():
            # scaling_factor: 1 / std of the latents (posterior draws) of up to 2,048 training images (SD's convention)
            x = torch.stack([train[i][0] for i in range(min(len(train), 2048))]).to(dev)
            z = torch.cat([vae.encode(part).latent_dist.sample(gen) for part in x.split(256)])
            vae.register_to_config(scaling_factor=1.0 / z.std().item())
            x_test = torch.stack([held_out[i][0] for i in range(min(len(held_out), 500))]).to(dev)
            x_rec = torch.cat([vae.decode(vae.encode(part).latent_dist.mode()).sample for part in x_test.split(256)])
        mse = (x_rec.clamp(-1, 1) - x_test).pow(2).mean().item()  # on [-1, 1]: peak-to-peak 2
        psnr = 10 * torch.log10(torch.tensor(4.0 / mse)).item()
        save_folder(out, vae)
        save_grid(torch.cat([x_test[:16], x_rec[:16]]).cpu(), os.path.join(out, "reconstructions.png"), nrow=16)
        write_json(dict(vars(args), shape=shape, latent_shape=latent_shape, steps_done=step,
                        scaling_factor=vae.config.scaling_factor, held_out_psnr=psnr, wall_minutes=(time.time() - t0) / 60),
                   os.path.join(out, "train_config.json"))
        print(f"vae: {step} steps in {(time.time() - t0) / 60:.1f} min -> {out}: held-out PSNR {psnr:.1f} dB, latents' "
              f"std {z.std().item():.3f} (scaling_factor {vae.config.scaling_factor:.3f}); {out}/reconstructions.png "
              f"(top: real, bottom: decoded)")


if __name__ == "__main__":
    keep_freed_memory()  # CPU speed (cli.keep_freed_memory)
    run(main)
