"""Train a teacher (µbase) where no pretrained one can be had (MNIST, CelebA): DDPM or flow matching, on pixels or
on a VAE's latents.

    python train_teacher.py --dataset mnist                         # the seed's size: n_feat 128, 20 epochs
    python train_teacher.py --n-feat 32 --max-minutes 9 --lr 1e-3   # CPU size
    python train_teacher.py --schedule flow --time-sampling logit-normal          # flow matching, as SD3 trains
    python train_teacher.py --dataset fashion-mnist --vae runs/fashion-mnist/vae --backbone dit   # latent (train_vae.py)
    accelerate launch train_teacher.py ...                          # data-parallel over processes / GPUs

Writes <run-dir>/teacher/ in diffusers format (config.json, diffusion_pytorch_model.safetensors,
scheduler_config.json; a latent teacher's VAE in vae/), train_config.json, samples.png; train_state.pt while training,
for --resume.
"""
import json
import os
import time

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, DiTTransformer2DModel
from diffusers.optimization import get_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from cli import UserError, keep_freed_memory, number, parse, progress, run, script_parser
from data import captioned, encoded_dataset, load_dataset, save_grid
from files import LATENTS, STATE, TEACHER, check_run_folder, load_state, save_state, write_json
from losses import denoising_loss
from checkpoints import load_text_encoder, save_teacher, weights_hash
from models import Autoencoder, Denoiser, TextEncoder, make_teacher, make_text_encoder
from recipes import PRESETS, default_guidance
from sampling import sample_teacher


def main():
    p = script_parser(__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="dataset folder (MNIST IDX files, cifar-10-batches-py, or images)")
    p.add_argument("--epochs", type=number(int, 0), default=20, help="passes over the data (the seed: 20)")
    p.add_argument("--max-steps", type=number(int, 0), default=None, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--max-minutes", type=number(float, 0), default=None, help="stop after this much wall time (CPU demo budget)")
    p.add_argument("--batch-size", type=number(int, 0), default=256, help="global batch (the seed's source: 256)")
    p.add_argument("--lr", type=number(float, 0), default=1e-4, help="AdamW learning rate (the seed's source: 1e-4)")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"], help="cosine decays to 0 at the last step")
    p.add_argument("--warmup-steps", type=number(int, 0, inclusive=True), default=0, help="linear warm-up steps")
    p.add_argument("--n-feat", type=number(int, 0), default=128, help="MNIST ContextUnet width (128 = the seed's 6.6M params)")
    p.add_argument("--unet-config", type=json.loads, default=None,
                   help="JSON overriding the UNet2DModel's or the DiT's config (CelebA's, CIFAR-10's, or a custom "
                        "run's), e.g. a tiny one for tests")
    p.add_argument("--image-size", type=number(int, 0), default=None,
                   help="your own images (--data-dir, no --dataset): the teacher's square size; class subfolders make "
                        "it class-conditional (label dropout gives the null class for guidance)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None, help="your own images: grey (1) or RGB (3); default 3")
    p.add_argument("--schedule", default="ddpm", choices=["ddpm", "flow"],
                   help="the noise family: DDPM (linear β; --prediction-type) or flow matching (SD3's: x_t = (1-σ) x0 "
                        "+ σ ε, the backbone predicts the velocity ε - x0; FlowMatchEulerDiscreteScheduler)")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction"],
                   help="DDPM: what the backbone predicts (default epsilon; v gives clean one-step images before "
                        "distillation); a flow teacher predicts the velocity")
    p.add_argument("--shift", type=number(float, 0), default=1.0,
                   help="flow: σ = shift s / (1 + (shift - 1) s), more of the grid at high noise for shift > 1 (SD3: 3 at "
                        "1024 px); 1 = none")
    p.add_argument("--time-sampling", default="uniform", choices=["uniform", "logit-normal"],
                   help="the density of the training timesteps: uniform over the T of them, or SD3's logit-normal "
                        "(u = sigmoid(N(--logit-mean, --logit-std)), more weight on the middle of the schedule)")
    p.add_argument("--logit-mean", type=float, default=0.0, help="logit-normal's mean (SD3: 0)")
    p.add_argument("--logit-std", type=number(float, 0), default=1.0, help="logit-normal's std (SD3: 1)")
    p.add_argument("--vae", default=None,
                   help="a VAE folder (train_vae.py's <run-dir>/vae, or any AutoencoderKL): train a latent teacher on "
                        "its latents of the data; the teacher folder keeps it in vae/")
    p.add_argument("--text-encoder", default=None,
                   help="a text-to-image teacher (SD's shape: a UNet2DConditionModel on --vae latents) on the captions "
                        "of --data-dir's metadata.jsonl (write_captions.py): `new` for a small CLIP text encoder and "
                        "tokenizer made here for them, or a folder holding text_encoder/ and tokenizer/ (an SD pipeline)")
    p.add_argument("--backbone", default=None, choices=["contextunet", "unet", "dit"],
                   help="the denoiser: MNIST's ContextUnet (28x28 pixels), a UNet2DModel, or a DiTTransformer2DModel; "
                        "default the dataset's own, a small UNet2DModel for latents or your own images"),
    p.add_argument("--label-dropout", type=number(float, 0, inclusive=True), default=0.1,
                   help="fraction of labels replaced by the null label, so the teacher supports guidance "
                        "(0: a custom teacher gets no null class)")
    p.add_argument("--ema", type=number(float, 0, inclusive=True), default=0.0, help="EMA decay of the saved weights (0 = off)")
    p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="max gradient norm")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="autocast dtype (bf16 is faster on CPUs with bf16 units and on GPUs)")
    p.add_argument("--num-workers", type=number(int, 0, inclusive=True), default=0, help="data loader workers")
    p.add_argument("--log-every", type=number(int, 0), default=50, help="status line every N steps")
    p.add_argument("--ckpt-every", type=number(int, 0), default=500, help="save weights + training state every N steps")
    p.add_argument("--guidance", type=number(float, 0, inclusive=True), default=None, help="guidance scale of the sample grid (conditional teachers); default recipes.default_guidance")
    p.add_argument("--sampling-steps", type=number(int, 0), default=25, help="DDIM steps of the sample grid")
    p.add_argument("--resume", action="store_true", help="continue from <run-dir>/teacher/train_state.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a finished teacher in <run-dir>/teacher/")
    args = parse(p)
    if args.schedule == "flow" and args.prediction_type:
        raise UserError(f"--prediction-type {args.prediction_type} is a DDPM teacher's; a flow-matching teacher "
                        f"(--schedule flow) predicts the velocity ε - x0: drop --prediction-type")
    if args.schedule == "ddpm" and args.shift != 1.0:
        raise UserError("--shift is a flow-matching teacher's timestep shift: drop it, or add --schedule flow")
    args.prediction_type = args.prediction_type or ("epsilon" if args.schedule == "ddpm" else "flow")
    shape = PRESETS[args.dataset]["shape"] or (args.channels or 3, args.image_size, args.image_size)
    if PRESETS[args.dataset]["shape"] and (args.image_size or args.channels):
        raise UserError(f"--image-size and --channels are for your own images, but {args.dataset}'s teacher makes "
                        f"{'x'.join(map(str, shape))} images: drop them, or drop --dataset to train on --data-dir images")
    out = os.path.join(args.run_dir, TEACHER)
    state_path = os.path.join(out, STATE)
    check_run_folder(out, args.resume, args.overwrite, "a teacher", finished="train_config.json")

    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=not torch.cuda.is_available())  # cpu: real DDP under torchrun
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} is not divisible by the {world} processes: pick a multiple of {world}")
    dataset = load_dataset(args.dataset, args.data_dir, verbose=accelerator.is_main_process, shape=shape)
    classes = getattr(dataset, "classes", None)
    vae = open_vae(args.vae, shape) if args.vae else None
    text = None
    if args.text_encoder:  # the captions are the labels: caption k = prompt k of the text encoder's table
        if not vae:
            raise UserError("--text-encoder makes an SD-shaped teacher, on latents: add --vae (train_vae.py's)")
        if shape[-1] % 8:
            raise UserError(f"--text-encoder: a StableDiffusionPipeline makes images of a multiple of 8 pixels, not "
                            f"{shape[-1]}: pass --image-size {8 * (shape[-1] // 8 + 1)} (the images are resized)")
        dataset, captions = captioned(dataset, args.data_dir)
        text = (TextEncoder(*make_text_encoder(captions)) if args.text_encoder == "new" else
                load_text_encoder(args.text_encoder)).to(accelerator.device)
        text.set_prompts(captions)
        classes = None
    if vae:  # a latent teacher learns the data's latents, encoded once (cached in <run-dir>/latents)
        cache = os.path.join(args.run_dir, LATENTS, f"{weights_hash(args.vae)}-{args.dataset}-{len(dataset)}.safetensors")
        if accelerator.is_main_process:
            encoded_dataset(dataset, vae.to(accelerator.device), cache)
        accelerator.wait_for_everyone()
        dataset = encoded_dataset(dataset, vae.to(accelerator.device), cache)
        shape = tuple(dataset[0][0].shape)
    torch.manual_seed(args.seed)  # the initial weights
    backbone, scheduler = make_teacher(args.dataset, args.prediction_type, args.n_feat, args.unet_config, shape,
                                       len(classes or []), null_class=args.label_dropout > 0, schedule=args.schedule,
                                       backbone=args.backbone, shift=args.shift, clip_sample=vae is None,
                                       cross_attention_dim=text and text.model.config.hidden_size)
    model = Denoiser(backbone, scheduler, vae, text).to(accelerator.device)
    if isinstance(backbone, DiTTransformer2DModel):  # in train mode a DiT drops 10% of its labels itself, from the
        model.eval()  # global RNG; --label-dropout does that from this run's stream (a DiT has no dropout or BatchNorm)
    args.guidance = default_guidance(model.null_label is not None) if args.guidance is None else args.guidance
    # EMA of the parameters; BatchNorm statistics are recomputed for the averaged weights at the end (refresh_batchnorm)
    ema = AveragedModel(model.backbone, multi_avg_fn=get_ema_multi_avg_fn(args.ema)) if args.ema else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps_per_epoch = len(dataset) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"--batch-size {args.batch_size} is larger than the dataset ({len(dataset)} images): use a smaller batch")
    total = args.max_steps or args.epochs * steps_per_epoch
    lr_sched = get_scheduler(args.lr_schedule, opt, num_warmup_steps=args.warmup_steps, num_training_steps=total)
    gen = torch.Generator().manual_seed(args.seed)  # noise, t, label dropout: one global stream, sliced per process
    step = 0
    if args.resume:
        state = load_state(state_path)
        model.backbone.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        lr_sched.load_state_dict(state["lr_sched"])
        if ema:
            ema.load_state_dict(state["ema"])
        gen.set_state(state["gen"])
        step = state["step"]
    model, opt = accelerator.prepare(model, opt)
    den = accelerator.unwrap_model(model)
    config = dict(vars(args), num_processes=world, params=sum(p.numel() for p in backbone.parameters()),
                  total_steps=total, shape=shape, classes=classes)
    if accelerator.is_main_process:
        os.makedirs(out, exist_ok=True)
        print("config:", config)

    def checkpoint():
        """The training state only: the teacher folder is written once, at the end (after EMA's BatchNorm refresh)."""
        if accelerator.is_main_process:
            save_state(dict(model=den.backbone.state_dict(), opt=opt.state_dict(),
                            lr_sched=lr_sched.state_dict(), ema=ema.state_dict() if ema else {}, gen=gen.get_state(),
                            step=step), state_path)

    t0, t_log, stop = time.time(), time.time(), False
    bar = progress(total=total, initial=step, desc="teacher", disable=not accelerator.is_main_process)
    while step < total and not stop:
        epoch, offset = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed + epoch))
        idx = perm[: steps_per_epoch * args.batch_size].view(steps_per_epoch, args.batch_size)[offset:, rank::world]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=idx.tolist(), num_workers=args.num_workers)
        for x0, y in loader:
            x0, y = x0.to(accelerator.device), y.to(accelerator.device)
            Bg, mine, T = args.batch_size, slice(rank, None, world), scheduler.config.num_train_timesteps
            eps = torch.randn((Bg, *x0.shape[1:]), generator=gen)[mine].to(x0.device)
            t = training_timesteps(args, Bg, T, gen)[mine].to(x0.device)
            drop = (torch.rand(Bg, generator=gen) < args.label_dropout)[mine].to(x0.device)
            if den.null_label is not None:
                y = torch.where(drop, torch.full_like(y, den.null_label), y)  # the null label
            with accelerator.autocast():
                loss = denoising_loss(model(den.add_noise(x0, eps, t), t, y), den.target(x0, eps, t))
            if not torch.isfinite(loss):
                raise UserError(f"loss is {loss.item()} at step {step}: lower --lr; the last good checkpoint is in {out}")
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            lr_sched.step()
            opt.zero_grad(set_to_none=True)
            if ema:
                ema.update_parameters(accelerator.unwrap_model(model).backbone)
            step += 1
            bar.update(1)
            if step % args.log_every == 0 and accelerator.is_main_process:
                bar.write(f"step {step:6d} | loss {loss.item():.4f} | grad {grad_norm.item():.3f} | "
                          f"lr {lr_sched.get_last_lr()[0]:.2e} | {(time.time() - t_log) / args.log_every * 1000:.0f} ms/step")
                t_log = time.time()
            stop = args.max_minutes is not None and time.time() - t0 > args.max_minutes * 60
            stop = bool(accelerator.gather(torch.tensor([stop], device=accelerator.device)).any())  # all ranks agree
            if step % args.ckpt_every == 0 or step == total or stop:
                checkpoint()
            if step == total or stop:
                break
    bar.close()
    if ema:
        refresh_batchnorm(Denoiser(ema.module, scheduler, vae, text).to(accelerator.device).eval(), dataset, args)
    if accelerator.is_main_process:
        save_teacher(ema.module if ema else den.backbone, scheduler, out, vae and vae.vae, text)
        write_json(dict(config, steps_done=step, wall_minutes=(time.time() - t0) / 60), os.path.join(out, "train_config.json"))
        den = Denoiser(ema.module if ema else den.backbone, scheduler, vae, text).eval()
        n_classes = den.num_classes
        rows = min(n_classes, 10) or 8  # a row per class (the first 10 prompts of a text-to-image teacher)
        g = torch.Generator().manual_seed(args.seed)
        z = torch.randn((rows * 8, *shape), generator=g).to(accelerator.device)
        y = torch.arange(rows, device=z.device).repeat_interleave(8) if n_classes else None
        x = sample_teacher(den, z, y, args.sampling_steps, args.guidance if n_classes else 1.0, progress=True)
        with torch.no_grad():
            save_grid(den.decode(x), os.path.join(out, "samples.png"), nrow=8)
        print(f"teacher: {step} steps in {(time.time() - t0) / 60:.1f} min -> {out} (grid: {out}/samples.png, "
              f"DDIM-{args.sampling_steps}{f', guidance {args.guidance}' if n_classes else ''})")


def training_timesteps(args, B, T, gen):
    """B training timesteps of T from the run's stream: uniform (DDPM's), or --time-sampling logit-normal (SD3's
    training: u = sigmoid(n), n ~ N(mean, std), read as its script reads it, the index of u T into the scheduler's
    timesteps, which run from the noisiest down: t = T - 1 - floor(u T))."""
    if args.time_sampling == "uniform":
        return torch.randint(0, T, (B,), generator=gen)
    u = torch.sigmoid(args.logit_mean + args.logit_std * torch.randn(B, generator=gen))
    return T - 1 - (u * T).long().clamp(max=T - 1)


def open_vae(folder, shape):
    """The AutoencoderKL of --vae, checked against the images it is to encode, as a models.Autoencoder."""
    try:
        vae = AutoencoderKL.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"--vae {folder} could not be loaded as an AutoencoderKL ({str(e).splitlines()[0][:120]}): "
                        f"train one with `python train_vae.py` (it writes <run-dir>/vae) or pass its folder")
    if vae.config.in_channels != shape[0]:
        raise UserError(f"--vae {folder} encodes {vae.config.in_channels}-channel images but the data has {shape[0]}: "
                        f"pass the VAE trained on this data")
    return Autoencoder(vae)


@torch.no_grad()
def refresh_batchnorm(den, dataset, args, batches=20):
    """Running BatchNorm statistics that match the EMA weights: the live model's statistics belong to other
    weights, and with them the averaged network's outputs are far off. torch's update_bn (a cumulative average) over
    `batches` batches of noised training images, each fed to the Denoiser as (x_t, t, y)."""
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=gen)
    dev = next(den.parameters()).device

    def noised():  # update_bn passes each item's first element to the model: here the Denoiser's arguments
        for _, (x0, y) in zip(range(batches), loader):
            x0, y = x0.to(dev), y.to(dev)
            t = torch.randint(0, den.T, (len(x0),), generator=gen).to(dev)
            yield ((den.add_noise(x0, torch.randn(x0.shape, generator=gen).to(dev), t), t, y),)
    update_bn(noised(), Unpacked(den).train(den.training))


class Unpacked(torch.nn.Module):
    """A module called with one tuple of arguments, as update_bn calls it."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, args):
        return self.module(*args)


if __name__ == "__main__":
    keep_freed_memory()  # CPU speed (cli.keep_freed_memory)
    run(main)
