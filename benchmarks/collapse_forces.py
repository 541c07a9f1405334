"""Which part of the generator's loss pulls its samples of one class together (mode collapse), by noise level.

    python benchmarks/collapse_forces.py --run-dir runs/fashion-mnist              # netG, µfake at the end of dmd/
    python benchmarks/collapse_forces.py --run-dir runs/fashion-mnist --at-init    # the three copies of the teacher
    python benchmarks/collapse_forces.py --run-dir runs/fashion-mnist --out kd --guidance 4   # DMD2's start from kd/

A gradient step x <- x - η ∇x L moves G's images; for the samples x_i of one class (mean x̄) their spread
Σ|x_i - x̄|² changes at the rate -2η Σ<x_i - x̄, ∇x_i L - mean ∇L>. The collapse rate printed is that sum divided by the
spread: positive = this term pulls the class's samples together, negative = it spreads them. It is computed for the
DM loss at each t-bin (all samples at one t), split into its two parts: the conditional score difference
(p_fake - p_cond) / w and guidance's extra pull -(s - 1)(p_cond - p_uncond) / w; and, for a run with the GAN term,
for the GAN term through µfake's head. Each is scaled as distill.py weighs it (λ_GAN for the GAN, 1 for the DM loss,
per sample: the numbers compare). Class-conditional teachers only.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import dmd  # noqa: E402
from checkpoints import open_teacher  # noqa: E402
from files import DMD, STATE, load_json, load_state  # noqa: E402
from losses import gan_generator_loss  # noqa: E402
from models import make_dmd_networks  # noqa: E402
from recipes import preset_of  # noqa: E402
from sampling import sample_generator, seeded_noise  # noqa: E402


def rate(x, grad):
    """Σ<x_i - x̄, ∇_i - mean ∇> / Σ|x_i - x̄|²: > 0 when a descent step shrinks the spread."""
    dx, dg = x - x.mean(0, keepdim=True), grad - grad.mean(0, keepdim=True)
    return ((dx * dg).sum() / dx.pow(2).sum()).item()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="a run folder: teacher/ and (without --at-init) <out>/train_state.pt")
    p.add_argument("--out", default=DMD, help="the distillation run inside --run-dir (kd: the warm start, µfake untrained)")
    p.add_argument("--at-init", action="store_true", help="netG and µfake as distillation starts them: copies of the teacher")
    p.add_argument("--guidance", type=float, default=None, help="µreal's guidance; default the run's (its config.json)")
    p.add_argument("--samples", type=int, default=64, help="samples per class")
    p.add_argument("--classes", type=int, default=10, help="the first N classes")
    p.add_argument("--bins", type=int, default=8, help="t-bins of the DM loss's range")
    args = p.parse_args()

    config = load_json(os.path.join(args.run_dir, args.out, "config.json")) if not args.at_init else {}
    s = args.guidance or config.get("guidance", 3.0)
    teacher_dir = os.path.join(args.run_dir, "teacher")
    teacher, _ = open_teacher(teacher_dir, config.get("dataset") or preset_of(teacher_dir) or "custom", s)
    if teacher.null_label is None:
        sys.exit("error: the collapse rates split the DM loss into its conditional and guidance parts: they need a "
                 "class-conditional teacher with a null class")
    gan = config.get("gan_weight", 0) > 0
    net_g, mu_real, mu_fake = make_dmd_networks(teacher.backbone, teacher.schedule.scheduler, gan_head=gan,
                                                head_input=config.get("gan_head_input", "bottleneck"))
    if not args.at_init:
        state = load_state(os.path.join(args.run_dir, args.out, STATE))
        net_g.backbone.load_state_dict(state["net_g"])
        mu_fake.backbone.load_state_dict(state["mu_fake"])
        if gan:
            mu_fake.head.load_state_dict(state["gan_head"])
    T, ts = mu_real.T, config.get("generator_timesteps", [mu_real.T - 1])
    edges = torch.linspace(round(0.02 * T), round(0.98 * T), args.bins + 1).round().long()
    gen = torch.Generator().manual_seed(0)

    rows = {}
    for c in range(args.classes):
        y = torch.full((args.samples,), c)
        with torch.no_grad():
            noise = seeded_noise(range(args.samples), mu_real.shape, 10 ** 8 + 1000 * c, len(ts))
            x = sample_generator(net_g, noise, y, ts)
        for b in range(args.bins):
            t = torch.full((args.samples,), int((edges[b] + edges[b + 1]) // 2))
            with torch.no_grad():
                x_t = mu_real.add_noise(x, torch.randn(x.shape, generator=gen), t)
                p_c, p_u = mu_real.x0(x_t, t, y), mu_real.x0(x_t, t, torch.full_like(y, mu_real.null_label))
                p_fake = mu_fake.x0(x_t, t, y)
                w = (x - (p_u + s * (p_c - p_u))).abs().mean(dim=(1, 2, 3), keepdim=True)
            # the DM loss's gradient per sample is g / numel (losses.dm_loss), g = its two parts' sum
            for name, g in (("conditional", (p_fake - p_c) / w), ("guidance", -(s - 1) * (p_c - p_u) / w)):
                rows.setdefault((name, b), []).append(rate(x, g / x[0].numel()))
        if gan:
            x_g = x.clone().requires_grad_(True)
            t_gan = torch.randint(0, max(1, round(config.get("gan_t_max", 1.0) * T)), (args.samples,), generator=gen)
            x_noised = mu_fake.add_noise(x_g, torch.randn(x.shape, generator=gen), t_gan)  # DMD2's diffusion GAN
            logit = dmd.realism(dmd.Networks(net_g, mu_real, mu_fake, regression=None), mu_fake, x_noised, t_gan, y,
                                dmd.StepConfig(gan_features=config.get("gan_features", "fake")))  # the run's head input
            loss = config["gan_weight"] * gan_generator_loss(logit) * args.samples
            rows.setdefault(("gan", 0), []).append(rate(x, torch.autograd.grad(loss, x_g)[0]))

    what = "at init (copies of the teacher)" if args.at_init else f"end of {args.run_dir}/{args.out}"
    print(f"collapse rate (> 0: pulls a class's samples together), netG and µfake {what}, guidance {s}, mean over "
          f"{args.classes} classes x {args.samples} samples\n")
    print("| term | " + " | ".join(f"t {int(edges[b])}-{int(edges[b + 1])}" for b in range(args.bins)) + " | all t |")
    print("|---|" + "---|" * (args.bins + 1))
    for name in ("conditional", "guidance"):
        per_bin = [sum(rows[(name, b)]) / len(rows[(name, b)]) for b in range(args.bins)]
        print(f"| DM, {name} | " + " | ".join(f"{v:.3g}" for v in per_bin) + f" | {sum(per_bin) / len(per_bin):.3g} |")
    if gan:
        print(f"| GAN, λ {config['gan_weight']} | " + " | ".join("" for _ in range(args.bins)) +
              f" | {sum(rows[('gan', 0)]) / args.classes:.3g} |")


if __name__ == "__main__":
    main()
