"""The networks: the three datasets' teacher configs and the factory that makes a fresh teacher (the MNIST backbone
itself is contextunet.py), what a backbone's config says about its images and classes, DMD2's GAN head, and the
`Denoiser` - a backbone seen as x_t -> x̂0(x_t, t, y) with classifier-free guidance (docs/ALGORITHM.md, "x̂0") -
from which netG / µreal / µfake are made as copies of µbase.

`python models.py` prints each dataset's teacher: architecture, parameter count, image shape, schedule.
"""
import copy
import math

import torch
import torch.nn as nn
from diffusers import DDPMScheduler, UNet2DModel
from einops.layers.torch import Rearrange

from cli import UserError
from contextunet import ContextUnet
from recipes import PRESETS


class DiscriminatorHead(nn.Module):
    """DMD2's GAN classifier on µfake's bottleneck features (B, C, h, w) -> one realism logit per image. DMD2's head
    (conv 4x4/2, GroupNorm, SiLU, conv 4x4/4, GroupNorm, SiLU, conv 1x1) is made for an 8x8 bottleneck; this one
    takes any size: conv 3x3, GroupNorm, SiLU, conv 4x4/2, GroupNorm, SiLU, global average pool, linear. For
    class-conditional teachers a class projection is added (Miyato & Koyama 2018): logit = w·φ + <embed(y), φ>, so
    that the head judges "a real 7", not "a real digit" - ContextUnet's down path never sees the label."""

    def __init__(self, channels, num_classes=0):
        super().__init__()
        groups = math.gcd(32, channels)
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.SiLU(),
                                  nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels),
                                  nn.SiLU(), nn.AdaptiveAvgPool2d(1), Rearrange("b c 1 1 -> b c"))
        self.out = nn.Linear(channels, 1)
        self.embed = nn.Embedding(num_classes, channels) if num_classes else None

    def forward(self, h, y=None):
        phi = self.body(h)  # (B, C)
        logit = self.out(phi).squeeze(1)
        if self.embed is not None and y is not None:
            logit = logit + (self.embed(y) * phi).sum(1)
        return logit


class LevelHeads(nn.Module):
    """--gan-head-input levels: one DiscriminatorHead on each map of ContextUnet's down path (28x28, 14x14, 7x7), their
    logits summed, so texture is judged at the resolution it lives at (the 28x28 map) as well as layout (the 7x7
    map): features at several levels of the network, the idea of FastGen's placement (on µfake's trainable down path,
    or with --gan-features teacher on the frozen teacher's, as FastGen)."""

    def __init__(self, channels, num_classes=0):
        super().__init__()
        self.heads = nn.ModuleList(DiscriminatorHead(c, num_classes) for c in channels)

    def forward(self, maps, y=None):
        return sum(head(h, y) for head, h in zip(self.heads, maps))


def bottleneck_channels(backbone, head_input="bottleneck"):
    """Channels of the features Denoiser.bottleneck returns (`head_input`: --gan-head-input); for "levels", one per
    map."""
    if isinstance(backbone, ContextUnet):
        n = backbone.config.n_feat
        return {"up": n, "levels": (n, n, 2 * n)}.get(head_input, 2 * n)
    return backbone.config.block_out_channels[-1]


# CIFAR-10: the exact config of google/ddpm-cifar10-32 (35,746,307 parameters).
CIFAR10_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                    freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6)
# CelebA 64x64: a small UNet2DModel near the seed's 426,691 parameters ("our model").
CELEBA_UNET = dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=1,
                   block_out_channels=(16, 32, 48), norm_num_groups=8,  # 425,859 parameters
                   down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)


def make_teacher(dataset, prediction_type="epsilon", n_feat=128, unet=None, shape=None, num_classes=0, null_class=True):
    """A fresh (untrained) backbone and its DDPM scheduler. `unet` overrides the UNet2DModel config. "custom": a
    small UNet2DModel (CelebA's) for images of `shape` (C, H, W), class-conditional when `num_classes` > 0 through
    num_class_embeds = num_classes + 1, the last being the null label of classifier-free guidance; `null_class=False`
    (a teacher trained without label dropout) leaves it out, as it would stay untrained and guidance would use it."""
    spec = PRESETS[dataset]
    T, beta_end = spec["T"] or 1000, spec.get("beta_end", 0.02)
    if dataset in ("mnist", "fashion-mnist"):
        backbone = ContextUnet(in_channels=1, n_feat=n_feat, n_classes=10, sample_size=28, num_train_timesteps=T)
    elif dataset == "custom":
        config = dict(CELEBA_UNET, sample_size=shape[-1], in_channels=shape[0], out_channels=shape[0],
                      num_class_embeds=num_classes + int(null_class) if num_classes else None)
        backbone = UNet2DModel(**{**config, **(unet or {})})
        if num_classes and null_class:
            backbone.register_to_config(_null_class_label=num_classes)  # private: diffusers keeps it and ignores it
    else:
        backbone = UNet2DModel(**{**(CIFAR10_UNET if dataset == "cifar10" else CELEBA_UNET), **(unet or {})})
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=beta_end,
                              beta_schedule="linear", prediction_type=prediction_type, clip_sample=True)
    return backbone, scheduler


def class_labels_of(backbone):
    """(number of real classes, the null label that classifier-free guidance needs, or None) of a backbone.
    ContextUnet: n_classes, null = n_classes. UNet2DModel: num_class_embeds; a teacher trained here with label
    dropout also carries `_null_class_label` in its config (the last embedding); others have no null label."""
    c = backbone.config
    if isinstance(backbone, ContextUnet):
        return c.n_classes, c.n_classes
    n, null = c.get("num_class_embeds") or 0, c.get("_null_class_label")
    return (n - 1, null) if null is not None else (n, None)


def image_shape(backbone):
    """(C, H, W) of the images a backbone makes, from its own config."""
    size = backbone.config.sample_size
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    if h != w:
        raise UserError(f"the teacher makes {h}x{w} images; only square images are supported (the data is "
                        f"resized and centre-cropped to a square): use a square teacher")
    return backbone.config.in_channels, h, w


BACKBONES = {"ContextUnet": ContextUnet, "UNet2DModel": UNet2DModel}


def count_params(model):
    return sum(p.numel() for p in model.parameters())


class Denoiser(nn.Module):
    """Wraps a backbone and its schedule. `x0(x_t, t, y, s)` is the teacher's estimate of the clean image. µfake
    also carries DMD2's GAN head (`head`), so that one optimiser and one data-parallel wrapper hold both."""

    def __init__(self, backbone, scheduler, head=None, head_input="bottleneck"):
        super().__init__()
        if isinstance(backbone, ContextUnet):  # (in place) its calls took 0.63-0.88x the time on CPU with channels-last
            backbone.to(memory_format=torch.channels_last)  # weights (oneDNN; measured on CPU only, docs/RESULTS.md);
            # UNet2DModel's did not (0.94-1.15x), so it keeps its layout
        self.backbone, self.head, self.head_input = backbone, head, head_input
        self.scheduler = scheduler  # the DDPM schedule it was trained with (saved beside a student)
        self.prediction_type = scheduler.config.prediction_type
        self.T = scheduler.config.num_train_timesteps
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.to(torch.float64), persistent=False)
        self.num_classes, self.null_label = class_labels_of(backbone)
        self.shape = image_shape(backbone)

    def forward(self, x_t, t, y=None, realism=False, for_x0=False, features=None):
        """The backbone's raw output (ε, v or x0, by prediction_type); y = None or the null label = unconditional.
        realism=True: the GAN head's logit on the bottleneck features instead (µfake only), or on `features` where
        given (another network's bottleneck of the same x_t: --gan-features teacher).
        for_x0=True: the output will become x̂0. An ε-teacher's x̂0 multiplies ε̂'s error by √(1-ᾱ_t)/√ᾱ_t (157 at
        t = T-1 on CIFAR-10's schedule), so under bf16/fp16 autocast the samples where that factor exceeds 1 (ᾱ_t <
        1/2) are computed in float32; the others, and v- or sample-prediction teachers, keep the autocast dtype."""
        if realism:
            return self.head(self.bottleneck(x_t, t, y) if features is None else features, y)
        device = x_t.device.type
        if not (for_x0 and self.prediction_type == "epsilon" and torch.is_autocast_enabled(device)):
            return self.raw(x_t, t, y)
        t = torch.as_tensor(t, device=x_t.device).expand(len(x_t))
        exact = self.alphas_cumprod[t] < 0.5
        out = torch.zeros(x_t.shape, dtype=torch.float32, device=x_t.device)
        for part, autocast in ((~exact, True), (exact, False)):
            if part.any():  # the backbone itself, not self(): accelerate's prepare() re-wraps self.forward in autocast
                with torch.autocast(device, enabled=autocast):
                    out[part] = self.raw(x_t[part].float() if not autocast else x_t[part], t[part],
                                         y[part] if y is not None else None).float()
        return out

    def raw(self, x_t, t, y=None):
        """The backbone's output, as it comes."""
        return self.backbone(x_t, t, class_labels=y if self.num_classes else None).sample

    def bottleneck(self, x_t, t, y=None):
        """The backbone's bottleneck features (B, C, h, w), where x_t, t and y have all entered, so the GAN head can
        judge "a real 7 at this noise level": ContextUnet's modulated 7x7 bottleneck (no up path; `head_input`
        "down": the down path's 7x7 map, "up": the first up block's 14x14 map, "levels": the down path's three maps,
        28x28, 14x14 and 7x7, as a tuple for LevelHeads), or UNet2DModel's mid-block output (through a whole forward:
        diffusers has no encoder-only call)."""
        if isinstance(self.backbone, ContextUnet):
            if self.head_input == "down":  # --gan-head-input down: the down path alone, blind to t and y
                return self.backbone.encode(x_t)[-1]
            if self.head_input == "levels":  # --gan-head-input levels: each of the down path's maps (LevelHeads)
                return self.backbone.encode(x_t)
            if self.head_input == "up":  # --gan-head-input up: t and y entered, spatial layout kept
                return self.backbone.up_features(x_t, t, y if self.num_classes else None)
            return self.backbone.bottleneck(x_t, t, y if self.num_classes else None)
        captured = []
        hook = self.backbone.mid_block.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            self(x_t, t, y)
        finally:
            hook.remove()
        return captured[0]

    def guided(self, x_t, t, y=None, s=1.0):
        """Classifier-free guidance on the raw output, out_u + s (out_c - out_u); s = 1 means none. s is a number or a
        (B,) tensor, one scale per sample. x̂0 is affine in the output for fixed (x_t, t): the same as guiding x̂0."""
        if (not torch.is_tensor(s) and s == 1.0) or self.null_label is None:
            return self(x_t, t, y, for_x0=True)
        null = torch.full_like(y, self.null_label)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        out_c, out_u = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]), for_x0=True).chunk(2)
        s = s.view(-1, *[1] * (x_t.dim() - 1)).to(out_c.dtype) if torch.is_tensor(s) else s
        return out_u + s * (out_c - out_u)

    def to_x0(self, x_t, t, out):
        """x̂0 from the raw output, in float64 (1/sqrt(ᾱ_t) is up to 158 near t = T-1), cast back."""
        a = self.alphas_cumprod[torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])].view(-1, 1, 1, 1)
        x_t64, out64 = x_t.double(), out.double()
        if self.prediction_type == "epsilon":
            x0 = (x_t64 - (1 - a).sqrt() * out64) / a.sqrt()
        elif self.prediction_type == "v_prediction":
            x0 = a.sqrt() * x_t64 - (1 - a).sqrt() * out64
        else:  # "sample"
            x0 = out64
        return x0.to(x_t.dtype)

    def x0(self, x_t, t, y=None, s=1.0):
        return self.to_x0(x_t, t, self.guided(x_t, t, y, s))

    def add_noise(self, x0, eps, t):
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε (the scheduler's own)."""
        return self.scheduler.add_noise(x0, eps, t)

    def target(self, x0, eps, t):
        """What the backbone is trained to output at (x_t, t): the teacher's own denoising objective
        (v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0 for v-prediction, the scheduler's get_velocity)."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, eps, t)
        return x0


def make_dmd_networks(backbone, scheduler, gan_head=False, seed=0, head_input="bottleneck"):
    """netG, µreal, µfake: three copies of µbase (µfake with DMD2's GAN head when `gan_head`, its initial weights
    drawn from `seed`, so runs repeat and every process starts alike; `head_input`: Denoiser.bottleneck). µreal is frozen; all three run in eval mode
    (dropout off, BatchNorm on running statistics) so an image never depends on its batch."""
    net_g = Denoiser(copy.deepcopy(backbone), scheduler).eval().requires_grad_(True)
    head = None
    if gan_head:
        with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
            torch.manual_seed(seed)
            channels, num_classes = bottleneck_channels(backbone, head_input), class_labels_of(backbone)[0]
            head = (LevelHeads if isinstance(channels, tuple) else DiscriminatorHead)(channels, num_classes)
    mu_fake = Denoiser(copy.deepcopy(backbone), scheduler, head, head_input).eval().requires_grad_(True)
    mu_real = Denoiser(backbone, scheduler, head_input=head_input).eval().requires_grad_(False)  # its features: µfake's kind
    return net_g, mu_real, mu_fake


def check_guidance(den, s, source):
    """Classifier-free guidance needs the teacher's unconditional (null) class."""
    if s != 1.0 and den.null_label is None:
        raise UserError(f"--guidance {s} needs a teacher with an unconditional (null) class; '{source}' has none: drop "
                        f"--guidance, or train the teacher with label dropout (train_teacher.py --label-dropout)")


if __name__ == "__main__":
    for name, spec in PRESETS.items():
        if name == "custom":
            continue
        backbone, scheduler = make_teacher(name)
        c = scheduler.config
        print(f"{name:8s} {type(backbone).__name__:12s} {count_params(backbone):>11,d} params  "
              f"image {'x'.join(map(str, spec['shape']))}  {'class-conditional' if spec['num_classes'] else 'unconditional'}  "
              f"DDPM T={c.num_train_timesteps} linear beta {c.beta_start:g}->{c.beta_end:g}  "
              f"teacher: {spec['teacher'] or 'train_teacher.py'}")
