"""The Denoiser: a teacher backbone seen as x_t -> x̂0(x_t, t, y) with classifier-free guidance (docs/ALGORITHM.md,
"x̂0"), and netG / µreal / µfake made from it.
"""
import copy

import torch
import torch.nn as nn

from cli import UserError
from contextunet import ContextUnet
from networks import DiscriminatorHead, bottleneck_channels, class_labels_of, image_shape


class Denoiser(nn.Module):
    """Wraps a backbone and its schedule. `x0(x_t, t, y, s)` is the teacher's estimate of the clean image. µfake
    also carries DMD2's GAN head (`head`), so that one optimiser and one data-parallel wrapper hold both."""

    def __init__(self, backbone, scheduler, head=None, head_input="bottleneck"):
        super().__init__()
        self.backbone, self.head, self.head_input = backbone, head, head_input
        self.scheduler = scheduler  # the DDPM schedule it was trained with (saved beside a student)
        self.prediction_type = scheduler.config.prediction_type
        self.T = scheduler.config.num_train_timesteps
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.to(torch.float64), persistent=False)
        self.num_classes, self.null_label = class_labels_of(backbone)
        self.shape = image_shape(backbone)

    def forward(self, x_t, t, y=None, realism=False, for_x0=False):
        """The backbone's raw output (ε, v or x0, by prediction_type); y = None or the null label = unconditional.
        realism=True: the GAN head's logit on the bottleneck features instead (µfake only).
        for_x0=True: the output will become x̂0. An ε-teacher's x̂0 multiplies ε̂'s error by √(1-ᾱ_t)/√ᾱ_t (157 at
        t = T-1 on CIFAR-10's schedule), so under bf16/fp16 autocast the samples where that factor exceeds 1 (ᾱ_t <
        1/2) are computed in float32; the others, and v- or sample-prediction teachers, keep the autocast dtype."""
        if realism:
            return self.head(self.bottleneck(x_t, t, y), y)
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
        "down": the down path's 7x7 map, "up": the first up block's 14x14 map), or UNet2DModel's mid-block output
        (through a whole forward: diffusers has no encoder-only call)."""
        if isinstance(self.backbone, ContextUnet):
            if self.head_input == "down":  # --gan-head-input down: the down path alone, blind to t and y
                return self.backbone.encode(x_t)[-1]
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
        """Classifier-free guidance on the raw output, out_u + s (out_c - out_u); s = 1 means none.
        x̂0 is affine in the output for fixed (x_t, t), so this is the same as guiding x̂0."""
        if s == 1.0 or self.null_label is None:
            return self(x_t, t, y, for_x0=True)
        null = torch.full_like(y, self.null_label)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        out_c, out_u = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]), for_x0=True).chunk(2)
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
            head = DiscriminatorHead(bottleneck_channels(backbone, head_input), class_labels_of(backbone)[0])
    mu_fake = Denoiser(copy.deepcopy(backbone), scheduler, head, head_input).eval().requires_grad_(True)
    mu_real = Denoiser(backbone, scheduler).eval().requires_grad_(False)
    return net_g, mu_real, mu_fake


def check_guidance(den, s, source):
    """Classifier-free guidance needs the teacher's unconditional (null) class."""
    if s != 1.0 and den.null_label is None:
        raise UserError(f"--guidance {s} needs a teacher with an unconditional (null) class; '{source}' has none: drop "
                        f"--guidance, or train the teacher with label dropout (train_teacher.py --label-dropout)")

