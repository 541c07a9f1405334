"""The networks: the three datasets' teacher configs and the factory that makes a fresh teacher (the MNIST backbone
itself is contextunet.py), what a backbone's config says about its images and classes, DMD2's GAN head, and the
`Denoiser` - a backbone seen as x_t -> x̂0(x_t, t, y) with classifier-free guidance (docs/ALGORITHM.md, "x̂0") -
from which netG / µreal / µfake are made as copies of µbase.

`python models.py` prints each dataset's teacher: architecture, parameter count, image shape, schedule.
"""
import copy
import math
import os

import torch
import torch.nn as nn
from diffusers import (DDPMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel,
                       UNet2DModel)
from einops import rearrange
from einops.layers.torch import Rearrange

from cli import UserError
from contextunet import ContextUnet
from recipes import PRESETS
from schedules import make_schedule


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
    if isinstance(backbone, DiTTransformer2DModel):
        return backbone.config.num_attention_heads * backbone.config.attention_head_dim
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


def make_teacher(dataset, prediction_type="epsilon", n_feat=128, unet=None, shape=None, num_classes=0, null_class=True,
                 schedule="ddpm", backbone=None, shift=1.0, clip_sample=True, cross_attention_dim=None):
    """A fresh (untrained) backbone and its scheduler.
    backbone: "contextunet" (MNIST's and Fashion-MNIST's, 28x28), "unet" (UNet2DModel: CIFAR-10's and CelebA's
    configs, or a small one sized to `shape`), "dit" (a small DiTTransformer2DModel for `shape`); default the
    dataset's own, or a small UNet2DModel where `shape` (C, H, W) is not the preset's (a latent teacher's latents, or
    your own images: "custom"). `unet` overrides the UNet2DModel's or the DiT's config. Class-conditional where the
    dataset or `num_classes` > 0 says so, with a null label for classifier-free guidance (UNet2DModel: the last of
    num_classes + 1 embeddings; `null_class=False`, a teacher trained without label dropout, leaves it out, as it
    would stay untrained and guidance would use it; ContextUnet and DiT always have theirs).
    schedule: "ddpm" (linear β, `prediction_type`, x̂0 clipped to [-1, 1] when `clip_sample`: pixels, not latents)
    or "flow" (FlowMatchEulerDiscreteScheduler with `shift`; the network predicts the velocity).
    cross_attention_dim: a text-to-image teacher, a small UNet2DConditionModel (SD's UNet) attending to text
    embeddings of that width; its prompts are its classes, set on its TextEncoder."""
    spec = PRESETS[dataset]
    T, beta_end = spec["T"] or 1000, spec.get("beta_end", 0.02)
    shape, num_classes = tuple(shape or spec["shape"]), spec["num_classes"] or num_classes
    backbone = backbone or ("contextunet" if dataset in ("mnist", "fashion-mnist") and shape == spec["shape"] else "unet")
    if cross_attention_dim:
        net = UNet2DConditionModel(**{**small_text_unet(shape, cross_attention_dim), **(unet or {})})
    elif backbone == "contextunet":
        if shape != (1, 28, 28):
            raise UserError(f"the ContextUnet makes 1x28x28 images, not {'x'.join(map(str, shape))}: use --backbone "
                            f"unet or dit")
        net = ContextUnet(in_channels=1, n_feat=n_feat, n_classes=num_classes, sample_size=28, num_train_timesteps=T)
    elif backbone == "dit":
        net = DiTTransformer2DModel(**{**small_dit(shape, num_classes), **(unet or {})})
    elif shape == spec["shape"] and dataset in ("cifar10", "celeba"):
        net = UNet2DModel(**{**(CIFAR10_UNET if dataset == "cifar10" else CELEBA_UNET), **(unet or {})})
    else:
        net = UNet2DModel(**{**small_unet(shape, num_classes + int(null_class) if num_classes else None), **(unet or {})})
        if num_classes and null_class:
            net.register_to_config(_null_class_label=num_classes)  # private: diffusers keeps it and ignores it
    if schedule == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=beta_end, beta_schedule="linear",
                                  prediction_type=prediction_type, clip_sample=clip_sample)
    return net, scheduler


def small_unet(shape, num_class_embeds=None):
    """CelebA's small UNet2DModel config for images (or latents) of `shape`, with as many of its 3 levels as the size
    can be halved into (14x14 latents: 2, 14 -> 7; 28 and up: 3)."""
    size, levels = shape[-1], 1
    while levels < 3 and size % 2 == 0:
        size, levels = size // 2, levels + 1
    return dict(CELEBA_UNET, sample_size=shape[-1], in_channels=shape[0], out_channels=shape[0],
                block_out_channels=CELEBA_UNET["block_out_channels"][:levels], num_class_embeds=num_class_embeds,
                down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels)


def small_text_unet(shape, cross_attention_dim):
    """A small UNet2DConditionModel config (SD's UNet, scaled down: two levels of 32 and 64 channels, attention to the
    text at the lower resolution and in the middle, where it costs a third of the time it does at the full one) for
    latents of `shape`."""
    return dict(sample_size=shape[-1], in_channels=shape[0], out_channels=shape[0], layers_per_block=2,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
                attention_head_dim=8, norm_num_groups=8)


def small_dit(shape, num_classes):
    """A small DiTTransformer2DModel config (DiT-S/2's shape scaled down: 6 blocks of width 128, patches of 2 pixels,
    or 1 where the size is odd) for `shape`. DiT is always class-conditional (adaLN-zero on a label embedding whose
    last row is the null label): an unconditional teacher has one class."""
    return dict(sample_size=shape[-1], in_channels=shape[0], out_channels=shape[0], num_layers=6,
                num_attention_heads=4, attention_head_dim=32, patch_size=2 if shape[-1] % 2 == 0 else 1,
                num_embeds_ada_norm=max(num_classes, 1))


def class_labels_of(backbone):
    """(number of real classes, the null label that classifier-free guidance needs, or None) of a backbone.
    ContextUnet: n_classes, null = n_classes. DiT: num_embeds_ada_norm, null = that number (the label table's extra
    row, DiT's class dropout; one class = unconditional). UNet2DModel: num_class_embeds; a teacher trained here with
    label dropout also carries `_null_class_label` in its config (the last embedding); others have no null label."""
    c = backbone.config
    if isinstance(backbone, ContextUnet):
        return c.n_classes, c.n_classes
    if isinstance(backbone, DiTTransformer2DModel):
        n = c.num_embeds_ada_norm
        return (n, n) if n > 1 else (0, None)
    n, null = c.get("num_class_embeds") or 0, c.get("_null_class_label")
    return (n - 1, null) if null is not None else (n, None)


def image_shape(backbone):
    """(C, H, W) of the images (or latents) a backbone makes, from its own config."""
    size = backbone.config.sample_size
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    if h != w:
        raise UserError(f"the teacher makes {h}x{w} images; only square images are supported (the data is "
                        f"resized and centre-cropped to a square): use a square teacher")
    return backbone.config.in_channels, h, w


BACKBONES = {"ContextUnet": ContextUnet, "UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel,
             "UNet2DConditionModel": UNet2DConditionModel}


def cast_frozen(module, dtype):
    """A frozen `module` (a backbone, a VAE, a text encoder) with its weights in `dtype`, in place, through nn.Module's
    own to(): diffusers' warns at any dtype that it keeps some modules in float32, of which its UNets and VAEs have
    none."""
    return nn.Module.to(module, dtype=dtype)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


class Autoencoder:
    """A latent teacher's VAE (diffusers AutoencoderKL): the images a latent denoiser's latents stand for. Frozen, and
    not a submodule of any network: netG, µreal and µfake share it and none trains it (nor saves, moves or checksums
    it with its own weights). latents = (E(x) - shift_factor) · scaling_factor, both from the VAE's config (SD's
    convention; shift_factor is Flux's, 0 where absent); images = D(latents / scaling_factor + shift_factor)."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scale, self.shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)  # AutoencoderKL halves the size per block but one

    def to(self, device):
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, x, generator=None):
        """Images in [-1, 1] (B, C, H, W) -> latents: one draw of the VAE's posterior (as SD's training takes it). A
        VAE stored in bf16 (distill.py --frozen-dtype) takes x in it and gives latents back in x's dtype."""
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample(generator).to(x.dtype)
        return (z - self.shift) * self.scale

    def decode(self, z):
        """Latents -> images in [-1, 1] (unclipped), in z's dtype; with grad where the caller has it."""
        return self.vae.decode((z / self.scale + self.shift).to(self.vae.dtype)).sample.to(z.dtype)

    def image_shape(self, latent_shape):
        c, h, w = latent_shape
        return self.vae.config.out_channels, h * self.factor, w * self.factor


class TextEncoder:
    """A text-to-image teacher's frozen text encoder (a transformers CLIPTextModel and its tokenizer, as in an SD
    pipeline folder) and the table of prompts its denoiser is read with. Prompts are the labels y of text-conditioned
    networks: `set_prompts` encodes each prompt once, and label y means the embedding embeds[y]; the empty prompt, the
    last row, is guidance's unconditional model (SD's negative prompt ""). Not a submodule of any network, like
    Autoencoder. SDXL's pair where `tokenizer_2`, `model_2` are given (its second CLIP, with a projection): see
    `encode`; its empty prompt is then zeros where `zero_null` (its pipeline's force_zeros_for_empty_prompt)."""

    def __init__(self, tokenizer, text_model, tokenizer_2=None, model_2=None, zero_null=False):
        self.tokenizer, self.model = tokenizer, text_model.eval().requires_grad_(False)
        self.tokenizer_2, self.model_2 = tokenizer_2, None if model_2 is None else model_2.eval().requires_grad_(False)
        self.zero_null = zero_null and model_2 is not None
        self.prompts, self.num_prompts, self.embeds, self.pooled = [], 0, None, None

    @property
    def models(self):
        """The encoder, or SDXL's two."""
        return [self.model] + ([self.model_2] if self.model_2 is not None else [])

    def to(self, device):
        for model in self.models:
            model.to(device)
        if self.embeds is not None:
            self.embeds = self.embeds.to(device)
            self.pooled = self.pooled if self.pooled is None else self.pooled.to(device)
        return self

    @torch.no_grad()
    def encode(self, texts):
        """(embeds (N, L, D), pooled (N, P) or None) of N texts, as the pipelines' encode_prompt makes them: each
        padded to its tokenizer's max length; SD: the last hidden state; SDXL: the two encoders' penultimate hidden
        states side by side, and the second's projected text embedding (the UNet's added `text_embeds`)."""
        def run(tokenizer, model, **kwargs):
            ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(model.device)
            return [model(part, **kwargs) for part in ids.split(256)]
        if self.model_2 is None:
            return torch.cat([out[0] for out in run(self.tokenizer, self.model)]).float(), None
        first, second = (run(tok, model, output_hidden_states=True)
                         for tok, model in ((self.tokenizer, self.model), (self.tokenizer_2, self.model_2)))
        embeds = torch.cat([torch.cat([a.hidden_states[-2], b.hidden_states[-2]], -1) for a, b in zip(first, second)])
        return embeds.float(), torch.cat([b.text_embeds for b in second]).float()

    def set_prompts(self, prompts, extra=()):
        """The labels: 0..P-1 the prompts a generator is asked for, then `extra` texts (real images' captions, which
        only the GAN head's real inputs use), then the empty prompt. Returns the label of each extra text."""
        texts = list(dict.fromkeys([*prompts, *[t for t in extra if t not in prompts]]))
        self.prompts, self.num_prompts = texts, len(dict.fromkeys(prompts))
        self.embeds, self.pooled = self.encode(texts + [""])
        if self.zero_null:  # SDXL's negative prompt when none is given: zeros, not the empty prompt's encoding
            self.embeds[-1], self.pooled[-1] = 0, 0
        index = {text: i for i, text in enumerate(texts)}
        return [index[t] for t in extra]

    def added_conditions(self, y, image_size, dtype):
        """SDXL's added conditions of labels y: the pooled `text_embeds` and the `time_ids` (original size, crop's
        top-left, target size: the image size, no crop, as its pipeline sends them by default); None for SD."""
        if self.pooled is None:
            return None
        time_ids = torch.tensor([*image_size, 0, 0, *image_size], dtype=dtype, device=y.device).expand(len(y), 6)
        return dict(text_embeds=self.pooled[y].to(dtype), time_ids=time_ids)

    @property
    def null_label(self):
        return len(self.prompts)


def make_text_encoder(texts, width=64, layers=2, seed=0, max_length=None):
    """A small CLIP text encoder (transformers' CLIPTextModel, random weights, frozen: it only has to tell prompts
    apart) and a character-level CLIPTokenizer for `texts`: every character they use is a token, no merges. For a
    text-to-image teacher trained here, where SD's encoder cannot be downloaded; saved and loaded as SD's are."""
    import json
    import tempfile
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    chars = sorted({c for text in texts for c in text.lower() if not c.isspace()})
    vocab = {token: i for i, token in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>",
                                                  "<|endoftext|>"])}
    length = max_length or max(len(text) for text in texts) + 2  # characters and the two special tokens (SD: 77)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                                  model_max_length=length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                                             num_hidden_layers=layers, num_attention_heads=max(1, width // 32),
                                             max_position_embeddings=length, bos_token_id=vocab["<|startoftext|>"],
                                             eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    return tokenizer, model


class Denoiser(nn.Module):
    """Wraps a backbone and its schedule (schedules.py: DDPM or flow matching, from the teacher's scheduler).
    `x0(x_t, t, y, s)` is the teacher's estimate of the clean image (of the latents, for a latent teacher, whose VAE
    `vae` holds: `decode` gives the images). µfake also carries DMD2's GAN head (`head`), so that one optimiser and
    one data-parallel wrapper hold both."""

    def __init__(self, backbone, scheduler, vae=None, text=None, head=None, head_input="bottleneck", adapter=None):
        super().__init__()
        if isinstance(backbone, ContextUnet):  # (in place) its calls took 0.63-0.88x the time on CPU with channels-last
            backbone.to(memory_format=torch.channels_last)  # weights (oneDNN; measured on CPU only, docs/RESULTS.md);
            # UNet2DModel's did not (0.94-1.15x), so it keeps its layout
        self.backbone, self.head, self.head_input = backbone, head, head_input
        self.schedule = make_schedule(scheduler)
        self.prediction_type, self.T = self.schedule.prediction_type, self.schedule.T
        self.vae = vae if vae is None or isinstance(vae, Autoencoder) else Autoencoder(vae)
        self.text = text  # a text-to-image teacher's TextEncoder: its prompts are the labels
        self.labels = class_labels_of(backbone)
        # a base shared with LoRA adapters (make_dmd_networks' lora_rank): this network's adapter, None = the base alone
        self.adapter, self.lora_layers = adapter, []
        if getattr(backbone, "peft_config", None):
            from peft.tuners.tuners_utils import BaseTunerLayer
            self.lora_layers = [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]
        self.shape = image_shape(backbone)  # what the backbone makes: images, or a latent teacher's latents
        self.image_shape = self.vae.image_shape(self.shape) if self.vae else self.shape

    @property
    def num_classes(self):
        """The labels a generator is asked for: classes, or a text-to-image teacher's prompts (TextEncoder's table)."""
        return self.text.num_prompts if self.text is not None else self.labels[0]

    @property
    def null_label(self):
        """The unconditional label of classifier-free guidance (the empty prompt), or None."""
        return self.text.null_label if self.text is not None else self.labels[1]

    def forward(self, x_t, t, y=None, realism=False, for_x0=False, features=None):
        """The backbone's raw output (ε, v, x0 or the flow velocity, by the schedule); y = None or the null label =
        unconditional. realism=True: the GAN head's logit on the bottleneck features instead (µfake only), or on
        `features` where given (another network's bottleneck of the same x_t: --gan-features teacher).
        for_x0=True: the output will become x̂0. An ε-teacher's x̂0 multiplies ε̂'s error by √(1-ᾱ_t)/√ᾱ_t (157 at
        t = T-1 on CIFAR-10's schedule), so under bf16/fp16 autocast the samples where that factor exceeds 1 (ᾱ_t <
        1/2) are computed in float32; the others, and other teachers, keep the autocast dtype."""
        if realism:  # (the head is trained, so float32, where the features may come from bf16 weights)
            features = self.bottleneck(x_t, t, y) if features is None else features
            return self.head(tuple(f.float() for f in features) if isinstance(features, tuple) else features.float(), y)
        device = x_t.device.type
        if not (for_x0 and torch.is_autocast_enabled(device)):
            return self.raw(x_t, t, y)
        t = self.schedule.expand(t, x_t)
        exact = self.schedule.amplifies_error(t)
        if not exact.any():
            return self.raw(x_t, t, y)
        out = torch.zeros(x_t.shape, dtype=torch.float32, device=x_t.device)
        for part, autocast in ((~exact, True), (exact, False)):  # (weights stored in bf16 compute in bf16 anyway)
            if part.any():  # the backbone itself, not self(): accelerate's prepare() re-wraps self.forward in autocast
                with torch.autocast(device, enabled=autocast):
                    out[part] = self.raw(x_t[part].float() if not autocast else x_t[part], t[part],
                                         y[part] if y is not None else None).float()
        return out

    @property
    def dtype(self):
        """The dtype the backbone's weights are stored in (float32, or bf16 for frozen ones: distill.py
        --frozen-dtype; LoRA adapters on a bf16 base stay float32); None for a backbone without weights."""
        return next((p.dtype for name, p in self.backbone.named_parameters() if "lora_" not in name), None)

    def raw(self, x_t, t, y=None):
        """The backbone's output, as it comes (a DiT's learned-σ half, where it has one, split off), at the network
        timestep of t (flow: σ_t T). A backbone stored in another dtype than x_t's takes its inputs cast to its own
        and gives its output back in x_t's (t stays float32: diffusers embeds it in float32)."""
        t = self.schedule.model_timestep(self.schedule.expand(t, x_t))
        for layer in self.lora_layers:  # this network's adapter on the shared base (peft's set_adapter would also
            layer._disable_adapters = self.adapter is None  # flip requires_grad, cutting netG's gradient through µfake)
            layer._active_adapter = [self.adapter] if self.adapter else layer._active_adapter
        dtype = self.dtype or x_t.dtype
        x = x_t.to(dtype)
        if self.text is not None:  # y: the prompts' labels, None = the empty prompt
            y = torch.full((len(x_t),), self.null_label, device=x_t.device) if y is None else y
            out = self.backbone(x, t, encoder_hidden_states=self.text.embeds[y].to(dtype),
                                added_cond_kwargs=self.text.added_conditions(y, self.image_shape[1:], dtype)).sample
        elif isinstance(self.backbone, DiTTransformer2DModel):  # always class-conditional: label 0 for the one class
            y = y if self.num_classes else torch.zeros(len(x_t), dtype=torch.long, device=x_t.device)
            out = self.backbone(x, t, class_labels=y).sample[:, :x_t.shape[1]]
        else:
            out = self.backbone(x, t, class_labels=y if self.num_classes else None).sample
        return out if dtype == x_t.dtype else out.to(x_t.dtype)

    def bottleneck(self, x_t, t, y=None):
        """The backbone's bottleneck features (B, C, h, w), where x_t, t and y have all entered, so the GAN head can
        judge "a real 7 at this noise level": ContextUnet's modulated 7x7 bottleneck (no up path; `head_input`
        "down": the down path's 7x7 map, "up": the first up block's 14x14 map, "levels": the down path's three maps,
        28x28, 14x14 and 7x7, as a tuple for LevelHeads), UNet2DModel's mid-block output, or a DiT's tokens after its
        middle transformer block laid out as their patch grid (B, inner dim, h/p, w/p): the deepest point that is
        still a map of the image, as the UNet's mid block is (a whole forward each: diffusers has no encoder-only
        call)."""
        if isinstance(self.backbone, ContextUnet):
            if self.head_input == "down":  # --gan-head-input down: the down path alone, blind to t and y
                return self.backbone.encode(x_t)[-1]
            if self.head_input == "levels":  # --gan-head-input levels: each of the down path's maps (LevelHeads)
                return self.backbone.encode(x_t)
            if self.head_input == "up":  # --gan-head-input up: t and y entered, spatial layout kept
                return self.backbone.up_features(x_t, t, y if self.num_classes else None)
            return self.backbone.bottleneck(x_t, t, y if self.num_classes else None)
        dit = isinstance(self.backbone, DiTTransformer2DModel)
        block = (self.backbone.transformer_blocks[len(self.backbone.transformer_blocks) // 2] if dit
                 else self.backbone.mid_block)
        captured = []
        hook = block.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            self(x_t, t, y)
        finally:
            hook.remove()
        if dit:
            side = self.shape[-1] // self.backbone.config.patch_size
            return rearrange(captured[0], "b (h w) c -> b c h w", h=side)
        return captured[0]

    def trained_parameters(self):
        """What this network's optimiser updates: every parameter, or on a shared base its adapter's (and its head)."""
        if not self.adapter:
            return list(self.parameters())
        return [p for name, p in self.named_parameters() if f".{self.adapter}." in name or name.startswith("head.")]

    def trained_state_dict(self):
        """The backbone weights a training state keeps: all of them, or on a shared base only this adapter's."""
        state = self.backbone.state_dict()
        return {k: v for k, v in state.items() if f".{self.adapter}." in k} if self.adapter else state

    def load_trained_state_dict(self, state):
        self.backbone.load_state_dict(state, strict=not self.adapter)

    def standalone(self):
        """The backbone as a student folder and pipeline keep it: itself, or a copy of the shared base with this
        network's adapter fused into its weights (diffusers' fuse_lora) and the adapters removed."""
        if not self.adapter:
            return self.backbone
        copy_ = copy.deepcopy(self.backbone).float()  # (a base stored in bf16: the adapter fused in float32)
        copy_.fuse_lora(adapter_names=[self.adapter])
        copy_.unload_lora()
        return copy_.eval()

    def guided(self, x_t, t, y=None, s=1.0):
        """Classifier-free guidance on the raw output, out_u + s (out_c - out_u); s = 1 means none. s is a number or a
        (B,) tensor, one scale per sample. x̂0 is affine in the output for fixed (x_t, t): the same as guiding x̂0."""
        if (not torch.is_tensor(s) and s == 1.0) or self.null_label is None:
            return self(x_t, t, y, for_x0=True)
        null = torch.full_like(y, self.null_label)
        t = self.schedule.expand(t, x_t)
        out_c, out_u = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]), for_x0=True).chunk(2)
        s = s.view(-1, *[1] * (x_t.dim() - 1)).to(out_c.dtype) if torch.is_tensor(s) else s
        return out_u + s * (out_c - out_u)

    def to_x0(self, x_t, t, out):
        """x̂0 from the raw output (the schedule's formula, in float64, cast back)."""
        return self.schedule.to_x0(x_t, t, out)

    def x0(self, x_t, t, y=None, s=1.0):
        return self.to_x0(x_t, t, self.guided(x_t, t, y, s))

    def add_noise(self, x0, eps, t):
        """x_t = a_t x0 + b_t ε (DDPM: √ᾱ_t, √(1-ᾱ_t); flow: 1-σ_t, σ_t)."""
        return self.schedule.add_noise(x0, eps, t)

    def target(self, x0, eps, t):
        """What the backbone is trained to output at (x_t, t): the teacher's own denoising objective (ε, v, x0, or
        the flow velocity ε - x0)."""
        return self.schedule.target(x0, eps, t)

    def decode(self, x):
        """What the generator's outputs look like: the VAE's images of a latent teacher's latents, else x itself."""
        return self.vae.decode(x) if self.vae else x

    def to(self, *args, **kwargs):
        """Also moves the VAE and the text encoder (kept out of the module tree) to the device asked for, if any."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]  # how nn.Module.to reads its arguments
        for frozen_part in (self.vae, self.text):
            if frozen_part is not None and device is not None:
                frozen_part.to(device)
        return super().to(*args, **kwargs)


def make_dmd_networks(backbone, scheduler, gan_head=False, seed=0, head_input="bottleneck", vae=None, text=None,
                      lora_rank=0, frozen_dtype=torch.float32):
    """netG, µreal, µfake: three copies of µbase (µfake with DMD2's GAN head when `gan_head`, its initial weights
    drawn from `seed`, so runs repeat and every process starts alike; `head_input`: Denoiser.bottleneck), sharing a
    latent teacher's frozen `vae` and a text-to-image teacher's `text` encoder and prompts. µreal is frozen; all three
    run in eval mode (dropout off, BatchNorm on running statistics) so an image never depends on its batch.
    lora_rank > 0: no copies. The three share µbase itself, frozen, and netG and µfake are each a LoRA adapter on it
    (peft, `add_lora`): one base in memory instead of three, and two small sets of trained weights.
    frozen_dtype: what µreal's weights (or the shared base's) are stored in; bf16 halves them (DMD2 keeps its SD
    µreal in bf16). netG and µfake, the adapters and the head, are trained, so always float32."""
    head = None
    if gan_head:
        with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
            torch.manual_seed(seed)
            channels, num_classes = bottleneck_channels(backbone, head_input), class_labels_of(backbone)[0]
            head = (LevelHeads if isinstance(channels, tuple) else DiscriminatorHead)(channels, num_classes)
    if lora_rank:
        add_lora(backbone, lora_rank, ("generator", "fake"), frozen_dtype)
        return (Denoiser(backbone, scheduler, vae, text, adapter="generator").eval(),
                Denoiser(backbone, scheduler, vae, text, head_input=head_input).eval(),
                Denoiser(backbone, scheduler, vae, text, head, head_input, adapter="fake").eval())
    net_g = Denoiser(copy.deepcopy(backbone), scheduler, vae, text).eval().requires_grad_(True)
    mu_fake = Denoiser(copy.deepcopy(backbone), scheduler, vae, text, head, head_input).eval().requires_grad_(True)
    mu_real = Denoiser(cast_frozen(backbone, frozen_dtype), scheduler, vae, text, head_input=head_input).eval().requires_grad_(False)  # µfake's kind of features
    return net_g, mu_real, mu_fake


# LoRA's layers on a diffusers UNet: attention's projections and feed-forward, the resnets' convolutions and time
# projections (the set DMD2's SDXL LoRA adapts), those of them a given network has
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                "conv_shortcut", "time_emb_proj")


def add_lora(backbone, rank, names, frozen_dtype=torch.float32):
    """A LoRA adapter of `rank` per name on `backbone` (peft, through diffusers' add_adapter; B = 0 at start, so each
    adapted network starts as the base), the base frozen, stored in `frozen_dtype`, and the adapters trained, in
    float32. One line where peft cannot wrap the backbone."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    cast_frozen(backbone, frozen_dtype)
    targets = [t for t in LORA_TARGETS if any(name.endswith(t) for name, _ in backbone.named_modules())]
    backbone.requires_grad_(False)
    try:
        if not targets or not hasattr(backbone, "add_adapter"):
            raise ValueError("no layer named like a diffusers UNet's")
        for name in names:
            backbone.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True),
                                 adapter_name=name)
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"--lora-rank: peft cannot put LoRA on this {type(backbone).__name__} ({str(e).splitlines()[0][:100]}): "
                        f"use a diffusers UNet (UNet2DModel, UNet2DConditionModel), or drop --lora-rank")
    for name, p in backbone.named_parameters():
        p.requires_grad_(any(f".{adapter}." in name for adapter in names))
    cast_training_params(backbone, torch.float32)  # (peft makes the adapters in their base layer's dtype)


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
