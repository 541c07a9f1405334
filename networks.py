"""The networks besides the MNIST backbone (contextunet.py): the three datasets' teacher configs and the factory that
makes a fresh teacher, DMD2's GAN head, and what a backbone's config says about its images and classes.

`python networks.py` prints each dataset's teacher: architecture, parameter count, image shape, schedule.
"""
import math

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


def bottleneck_channels(backbone, head_input="bottleneck"):
    """Channels of the features Denoiser.bottleneck returns (`head_input`: --gan-head-input)."""
    if isinstance(backbone, ContextUnet):
        return backbone.config.n_feat if head_input == "up" else 2 * backbone.config.n_feat
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
    if dataset == "mnist":
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
