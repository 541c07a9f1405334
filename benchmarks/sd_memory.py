"""Peak memory and time of one DMD2 step (a generator update and a fake-score update, with the GAN head) on a
Stable-Diffusion-1.5-shaped UNet2DConditionModel: its published config, random weights, one 64x64x4 latent (512x512
images), a 77 x 768 text embedding. Three ways to hold netG, µreal and µfake:

    full         three full copies, netG's and µfake's weights trained (AdamW)
    lora         three full copies, netG and µfake each a LoRA adapter on its own frozen copy
    lora-shared  one frozen base, netG and µfake two LoRA adapters on it (distill.py --lora-rank)

    python benchmarks/sd_memory.py                      # every condition, each in its own process, a table
    python benchmarks/sd_memory.py --condition lora-shared --limit-gb 16
    python benchmarks/sd_memory.py --width 0.5            # the same at half the channels: all three fit in 16 GB
    python benchmarks/sd_memory.py --frozen-dtype bfloat16  # frozen weights in bf16 (distill.py --frozen-dtype)

Each condition runs in a fresh process whose resident memory is watched: past --limit-gb it is stopped and reported
as not fitting (the machine's other work is kept safe). Peak = the process's maximum resident set (ru_maxrss), on the
CPU; step time = the second step's (the first allocates the optimiser states). On a GPU, the same weights and states
take the same bytes, activations differ by kernel. --frozen-dtype bfloat16 stores the frozen weights (µreal, the
LoRA bases, the text encoder) in bf16, as distill.py does; trained weights, their gradients and AdamW's states stay
float32.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
CONDITIONS = ("full", "lora", "lora-shared")


def watch(limit_gb):
    """Stop this process (exit code 3) once its resident memory passes limit_gb."""
    def run():
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            if rss > limit_gb * 2 ** 30:
                print(json.dumps(dict(fits=False, limit_gb=limit_gb)), flush=True)
                os._exit(3)
            time.sleep(0.02)
    threading.Thread(target=run, daemon=True).start()


def one_condition(name, rank, limit_gb, width, frozen_dtype):
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DConditionModel
    import dmd
    from models import Denoiser, TextEncoder, add_lora, cast_frozen, make_dmd_networks, make_text_encoder
    frozen = getattr(torch, frozen_dtype)
    watch(limit_gb)
    torch.manual_seed(0)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD's
    unet = UNet2DConditionModel(**dict(SD15_UNET, block_out_channels=tuple(int(c * width) for c in SD15_UNET["block_out_channels"]))).eval()
    unet_parameters = sum(p.numel() for p in unet.parameters())
    tokenizer, text_model = make_text_encoder(["a photo of a cat", "a photo of a dog"], width=768, layers=1,
                                              max_length=77)  # SD's 77 x 768 text embedding
    text = TextEncoder(tokenizer, cast_frozen(text_model, frozen))
    text.set_prompts(["a photo of a cat", "a photo of a dog"])
    if name == "lora":  # each trained network its own frozen copy with its own adapter
        nets = make_dmd_networks(unet, scheduler, gan_head=True, text=text, frozen_dtype=frozen)
        net_g, mu_real, mu_fake = nets
        for den, adapter in ((net_g, "generator"), (mu_fake, "fake")):
            add_lora(den.backbone, rank, (adapter,), frozen)
        net_g = Denoiser(net_g.backbone, scheduler, text=text, adapter="generator")
        mu_fake = Denoiser(mu_fake.backbone, scheduler, text=text, head=mu_fake.head, adapter="fake")
    else:
        net_g, mu_real, mu_fake = make_dmd_networks(unet, scheduler, gan_head=True, text=text,
                                                    lora_rank=rank if name == "lora-shared" else 0, frozen_dtype=frozen)
    cfg = dmd.StepConfig(batch_size=1, reg_weight=0, gan_weight=3e-3, guidance=1.75)  # DMD2's SD1.5 guidance
    nets = dmd.Networks(net_g, mu_real, mu_fake, regression=None)
    opt_g, opt_fake = (torch.optim.AdamW(n.trained_parameters(), lr=1e-6) for n in (net_g, mu_fake))
    real = torch.utils.data.TensorDataset(torch.randn(2, 4, 64, 64), torch.tensor([0, 1]))
    gen, accelerator = torch.Generator().manual_seed(0), Accelerator(cpu=True)
    times = []
    for step in range(2):
        b = dmd.draw_batch(gen, step, cfg, (4, 64, 64), 2, 1000, None, real)
        t0 = time.perf_counter()
        x, _ = dmd.generator_update(nets, opt_g, b, cfg, accelerator)  # both updates of a DMD2 step (the generator's
        dmd.fake_score_update(nets, opt_fake, x, b, cfg, accelerator)  # every time here; DMD2 makes it every 5th)
        times.append(time.perf_counter() - t0)
    trained = sum(p.numel() for n in (net_g, mu_fake) for p in n.trained_parameters())
    print(json.dumps(dict(fits=True, peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                          step_s=times[-1], trained_parameters=trained, unet_parameters=unet_parameters)),
          flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--condition", choices=CONDITIONS, default=None, help="one condition in this process (default: all, each in a new one)")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank of netG's and µfake's adapters (DMD2's SDXL LoRA: 64)")
    p.add_argument("--limit-gb", type=float, default=16.0, help="stop a condition whose resident memory passes this")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--frozen-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="what the frozen weights are stored in (distill.py --frozen-dtype)")
    p.add_argument("--width", type=float, default=1.0, help="scale of the UNet's channels (1: SD1.5's; 0.5: about a quarter "
                   "of its weights, so that all three conditions fit where full SD1.5 does not, for the ratios)")
    args = p.parse_args()
    if args.condition:
        import torch
        torch.set_num_threads(args.threads)
        one_condition(args.condition, args.lora_rank, args.limit_gb, args.width, args.frozen_dtype)
        return
    rows = []
    for name in CONDITIONS:
        r = subprocess.run([sys.executable, __file__, "--condition", name, "--lora-rank", str(args.lora_rank),
                            "--limit-gb", str(args.limit_gb), "--threads", str(args.threads), "--width", str(args.width),
                            "--frozen-dtype", args.frozen_dtype],
                           capture_output=True, text=True)
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        if not lines:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
        rows.append(dict(condition=name, **json.loads(lines[-1])))
        print(rows[-1], flush=True)
    import platform
    print(f"\nOne DMD2 step, SD1.5-shaped UNet2DConditionModel (channels x {args.width:g}), 64x64x4 latent, batch 1, "
          f"frozen weights {args.frozen_dtype}, CPU "
          f"({platform.processor() or platform.machine()}, {args.threads} threads), LoRA rank {args.lora_rank}:\n")
    print("| condition | peak resident memory | step time | trained parameters |\n|---|---|---|---|")
    for r in rows:
        peak = f"{r['peak_gb']:.1f} GB" if r["fits"] else f"> {r['limit_gb']:g} GB (stopped)"
        step = f"{r['step_s']:.1f} s" if r["fits"] else "-"
        trained = f"{r['trained_parameters'] / 1e6:,.1f} M" if r["fits"] else "-"
        print(f"| {r['condition']} | {peak} | {step} | {trained} |")


if __name__ == "__main__":
    main()
