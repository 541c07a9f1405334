"""The networks: teacher backbones, the feature classifier, loading and saving a teacher, and the Denoiser wrapper
that turns a backbone into x̂0(x_t, t, y) with classifier-free guidance (docs/ALGORITHM.md, "x̂0").

Every backbone is called the diffusers way, `model(x_t, t, class_labels=y).sample`, and saves and loads with
`save_pretrained` / `from_pretrained`, so a teacher is one folder holding `config.json` +
`diffusion_pytorch_model.safetensors` (the backbone) and `scheduler_config.json` (its DDPM noise schedule) - the
same flat layout as the hub's google/ddpm-cifar10-32.

`python models.py` prints each dataset's teacher: architecture, parameter count, image shape, schedule.
"""
import copy
import hashlib
import math
import os
import socket

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from einops.layers.torch import Rearrange

from cli import UserError
from files import TEACHER, atomic, load_json, save_folder, write_json
from recipes import PRESETS

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
GENERATOR_CONFIG = "generator.json"  # in a student's folder: the timesteps of its K steps


# ---------------------------------------------------------------------------------------------
# MNIST: ContextUnet (the architecture of TeaPearce/Conditional_Diffusion_MNIST), diffusers-style
# ---------------------------------------------------------------------------------------------
class ResidualConvBlock(nn.Module):
    def __init__(self, c_in, c_out, is_res=False):
        super().__init__()
        self.is_res, self.same_channels = is_res, c_in == c_out
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.GELU())

    def forward(self, x):
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        if not self.is_res:
            return x2
        return ((x if self.same_channels else x1) + x2) / 1.414  # keeps the variance of a sum of two


class UnetDown(nn.Sequential):
    def __init__(self, c_in, c_out):
        super().__init__(ResidualConvBlock(c_in, c_out), nn.MaxPool2d(2))


class UnetUp(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.model = nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, 2),
                                   ResidualConvBlock(c_out, c_out), ResidualConvBlock(c_out, c_out))

    def forward(self, x, skip):
        return self.model(torch.cat((x, skip), 1))


def embed_fc(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class ContextUnet(ModelMixin, ConfigMixin):
    """28x28 class-conditional U-Net: 28 -> 14 -> 7 -> 7x7 average-pool bottleneck and back.

    Time t/T and the one-hot class go through small MLPs; the class embedding scales and the time
    embedding shifts the up-path features. Label `n_classes` is the "null" label of classifier-free
    guidance: its one-hot row is all zeros. `num_class_embeds` (= n_classes + 1, the null label included) and
    `return_dict` are what diffusers pipelines read from a UNet.
    """

    @register_to_config
    def __init__(self, in_channels=1, n_feat=128, n_classes=10, sample_size=28, num_train_timesteps=400,
                 num_class_embeds=None):
        super().__init__()
        self.register_to_config(num_class_embeds=n_classes + 1)
        n = n_feat
        self.init_conv = ResidualConvBlock(in_channels, n, is_res=True)
        self.down1 = UnetDown(n, n)
        self.down2 = UnetDown(n, 2 * n)
        self.to_vec = nn.Sequential(nn.AvgPool2d(sample_size // 4), nn.GELU())
        self.timeembed1, self.timeembed2 = embed_fc(1, 2 * n), embed_fc(1, n)
        self.contextembed1, self.contextembed2 = embed_fc(n_classes, 2 * n), embed_fc(n_classes, n)
        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n, 2 * n, sample_size // 4, sample_size // 4),
                                 nn.GroupNorm(8, 2 * n), nn.ReLU())
        self.up1 = UnetUp(4 * n, n)
        self.up2 = UnetUp(2 * n, n)
        self.out = nn.Sequential(nn.Conv2d(2 * n, n, 3, 1, 1), nn.GroupNorm(8, n), nn.ReLU(),
                                 nn.Conv2d(n, in_channels, 3, 1, 1))

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        B, n = sample.shape[0], self.config.n_feat
        if class_labels is None:  # unconditional = the null label
            class_labels = torch.full((B,), self.config.n_classes, device=sample.device)
        c = F.one_hot(class_labels.long(), self.config.n_classes + 1)[:, :-1].to(sample.dtype)
        t = torch.as_tensor(timestep, device=sample.device).expand(B).to(sample.dtype)
        t = (t / self.config.num_train_timesteps)[:, None]
        x, down1, down2 = self.encode(sample)
        up1 = self.up0(self.to_vec(down2))
        up2 = self.up1(self.contextembed1(c).view(B, 2 * n, 1, 1) * up1 + self.timeembed1(t).view(B, 2 * n, 1, 1), down2)
        up3 = self.up2(self.contextembed2(c).view(B, n, 1, 1) * up2 + self.timeembed2(t).view(B, n, 1, 1), down1)
        out = self.out(torch.cat((up3, x), 1))
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def encode(self, sample):
        """The down path: (x 28x28, down1 14x14, down2 7x7, the bottleneck). It sees neither t nor the class: both
        enter on the way up."""
        x = self.init_conv(sample)
        down1 = self.down1(x)
        return x, down1, self.down2(down1)


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


def bottleneck_channels(backbone):
    """Channels of the features Denoiser.bottleneck returns."""
    if isinstance(backbone, ContextUnet):
        return 2 * backbone.config.n_feat
    return backbone.config.block_out_channels[-1]


class Classifier(ModelMixin, ConfigMixin):
    """Small CNN whose penultimate features stand in for Inception's where those weights cannot be had.
    Trained by evaluate.py on real data: on the classes where the dataset has them, else on predicting
    which of 4 rotations was applied (self-supervised, so unlabelled faces get meaningful features too)."""

    @register_to_config
    def __init__(self, in_channels=1, num_outputs=10, width=32, feature_dim=128, task="classes", test_accuracy=None,
                 dataset=None):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * w, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_outputs))

    def forward(self, x):
        """x in [-1, 1], (B, C, H, W) -> (features (B, feature_dim), logits (B, num_outputs))."""
        f = self.features(x)
        return f, self.head(f)


# ---------------------------------------------------------------------------------------------
# The three datasets' teachers
# ---------------------------------------------------------------------------------------------
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


def make_teacher(dataset, prediction_type="epsilon", n_feat=128, unet=None, shape=None, num_classes=0):
    """A fresh (untrained) backbone and its DDPM scheduler. `unet` overrides the UNet2DModel config. "custom": a
    small UNet2DModel (CelebA's) for images of `shape` (C, H, W), class-conditional when `num_classes` > 0 through
    num_class_embeds = num_classes + 1, the last being the null label of classifier-free guidance."""
    spec = PRESETS[dataset]
    T, beta_end = spec["T"] or 1000, spec.get("beta_end", 0.02)
    if dataset == "mnist":
        backbone = ContextUnet(in_channels=1, n_feat=n_feat, n_classes=10, sample_size=28, num_train_timesteps=T)
    elif dataset == "custom":
        config = dict(CELEBA_UNET, sample_size=shape[-1], in_channels=shape[0], out_channels=shape[0],
                      num_class_embeds=num_classes + 1 if num_classes else None)
        backbone = UNet2DModel(**{**config, **(unet or {})})
        if num_classes:
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


def check_guidance(den, s, source):
    """Classifier-free guidance needs the teacher's unconditional (null) class."""
    if s != 1.0 and den.null_label is None:
        raise UserError(f"--guidance {s} needs a teacher with an unconditional (null) class; '{source}' has none: drop "
                        f"--guidance, or train the teacher with label dropout (train_teacher.py --label-dropout)")


def image_shape(backbone):
    """(C, H, W) of the images a backbone makes, from its own config."""
    size = backbone.config.sample_size
    h, w = size if isinstance(size, (tuple, list)) else (size, size)
    if h != w:
        raise UserError(f"the teacher makes {h}x{w} images; only square images are supported (the data is "
                        f"resized and centre-cropped to a square): use a square teacher")
    return backbone.config.in_channels, h, w


BACKBONES = {"ContextUnet": ContextUnet, "UNet2DModel": UNet2DModel}


def save_teacher(backbone, scheduler, folder):
    """Diffusers layout (backbone + scheduler in one folder), every file renamed into place whole."""
    save_folder(folder, backbone, scheduler)


def save_student(backbone, scheduler, folder, timesteps):
    """A student: the teacher's folder layout plus generator.json, the generator's timesteps (K = their number), so
    that sampling, evaluation and the pipeline export run it at the timesteps it was trained for."""
    save_folder(folder, backbone, scheduler)
    write_json(dict(timesteps=[int(t) for t in timesteps]), os.path.join(folder, GENERATOR_CONFIG))


def save_pipeline(backbone, scheduler, folder, timesteps, card):
    """The student as a diffusers pipeline that `DiffusionPipeline.from_pretrained(folder)` loads with diffusers and
    torch alone (a ContextUnet student: with this repository's models.py importable): ConsistencyModelPipeline, a
    few-step generator pipeline that passes class labels to its UNet, with a scheduler that runs the student at its
    timesteps. One step: DDIM with trailing spacing (its one step is t = T-1 and returns x̂0). K steps: LCM, whose
    multistep sampling re-noises x̂0 with fresh noise exactly as sampling.sample_generator does (its timesteps are
    generator_timesteps'; intermediate x̂0 are not clipped, as here). `card` is the folder's README.md."""
    from diffusers import ConsistencyModelPipeline, DDIMScheduler, LCMScheduler
    if len(timesteps) == 1:
        sched = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    else:
        sched = LCMScheduler.from_config(scheduler.config, original_inference_steps=len(timesteps), clip_sample=False)
    save_folder(folder, ConsistencyModelPipeline(unet=backbone, scheduler=sched))
    with atomic(os.path.join(folder, "README.md")) as tmp, open(tmp, "w") as f:
        f.write(card)


def model_card(config, report=None):
    """README.md of an exported student: what it is, its teacher and recipe, how to run it, its evaluation if any."""
    K, classes = len(config["generator_timesteps"]), config.get("num_classes", 0)
    flags = " ".join(f"--{k.replace('_', '-')} {config[k]}" for k in (
        "lr", "batch_size", "gen_every", "guidance", "reg_weight", "gan_weight", "gan_disc_weight", "gan_t_max",
        "generator_steps") if k in config)
    labels = f"class_labels=list(range({min(classes, 8)})), " if classes else ""
    lines = [f"# A {K}-step image generator distilled with {'DMD2' if config['reg_weight'] == 0 else 'DMD'}", "",
             f"- teacher: `{config['teacher']}` (weights sha256 {config['teacher_hash']}), {config['prediction_type']}, "
             f"T = {config['T']}; the generator runs at timesteps {config['generator_timesteps']}",
             f"- data: {config['dataset']}" + (f" ({config['data_dir']})" if config.get("data_dir") else ""),
             f"- recipe: `distill.py {flags}`, {config.get('steps_done', '?')} steps", "",
             "```python", "import torch", "from diffusers import DiffusionPipeline",
             "pipe = DiffusionPipeline.from_pretrained(\"PATH/TO/THIS/FOLDER\")  # a ContextUnet: run from the repository",
             f"images = pipe(batch_size={min(classes, 8) or 8}, {labels}num_inference_steps={K}, "
             f"generator=[torch.Generator().manual_seed(i) for i in range({min(classes, 8) or 8})]).images", "```"]
    if report:
        lines += ["", f"Evaluation ({report['num_samples']} samples on held-out seeds, {report['feature_extractor']}, "
                      f"{report['device']}):", "", "| model | NFE | FID | precision | recall | class accuracy |", "|---|---|---|---|---|---|"]
        for r in report["rows"]:
            acc = "-" if r.get("class_accuracy") is None else f"{r['class_accuracy']:.1%}"
            lines.append(f"| {r['model']} | {r['nfe'] or '-'} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {acc} |")
    return "\n".join(lines) + "\n"


def student_timesteps(folder, T):
    """The generator's timesteps saved with a student; a folder without them (a teacher) is read at T-1, one step."""
    path = os.path.join(folder, GENERATOR_CONFIG)
    return load_json(path)["timesteps"] if os.path.isfile(path) else [T - 1]


def pipeline_subfolder(source):
    """"unet" where `source` is a pipeline folder (model_index.json, unet/, scheduler/), else None (a model folder)."""
    return "unet" if os.path.isfile(os.path.join(source, "model_index.json")) else None


def load_teacher(source):
    """(backbone, scheduler) from a model folder (the backbone's config + weights + scheduler_config.json), a pipeline
    folder (unet/ + scheduler/, as DDPMPipeline.save_pretrained writes it) or a hub id, in eval mode on the CPU."""
    sub = pipeline_subfolder(source) if os.path.isdir(source) else None
    if os.path.isdir(source):
        if sub and not os.path.isdir(os.path.join(source, sub)):
            raise UserError(f"pipeline folder '{source}' has no unet/: pass the folder that DDPMPipeline.save_pretrained "
                            f"wrote (model_index.json, unet/, scheduler/) or a model folder")
        if not any(os.path.isfile(os.path.join(source, sub or "", f)) for f in WEIGHT_FILES):
            raise UserError(f"teacher folder '{source}' has no {WEIGHT_FILES[0]}: train one with "
                            f"`python train_teacher.py` or pass --teacher FOLDER holding a saved teacher")
    elif os.path.exists(source) or source.startswith((".", "/")) or source.count("/") != 1:
        raise UserError(f"teacher '{source}' is neither a folder nor a hub id: train one with `python train_teacher.py` "
                        f"or pass --teacher FOLDER")
    elif not hub_reachable() and not hub_cached(source):
        raise UserError(f"hub id '{source}' cannot be fetched without network: download it where there is a network "
                        f"(`hf download {source} --local-dir DIR`) and pass --teacher DIR")
    try:
        config = BACKBONES["UNet2DModel"].load_config(source, subfolder=sub)
        cls = BACKBONES.get(config.get("_class_name"))
        if cls is None:
            raise UserError(f"teacher '{source}' is a {config.get('_class_name')}; supported backbones: "
                            f"{', '.join(BACKBONES)}")
        backbone = cls.from_pretrained(source, subfolder=sub)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler" if sub else None)
    except UserError:
        raise
    except Exception as e:  # network down, missing files, truncated or foreign weights: one line, not a traceback
        if os.path.isdir(source):
            raise UserError(f"teacher folder '{source}' could not be loaded ({str(e).splitlines()[0][:150]}): "
                            f"re-save it with `python train_teacher.py` or point --teacher at a complete folder")
        raise UserError(f"could not fetch hub id '{source}' ({str(e).splitlines()[0][:100]}): download it where there "
                        f"is a network (`hf download {source} --local-dir DIR`) and pass --teacher DIR")
    return backbone.eval(), scheduler


def default_teacher(dataset, run_dir):
    """<run-dir>/teacher when it exists (or the dataset has no pretrained teacher), else the hub id."""
    local = os.path.join(run_dir, TEACHER)
    return local if os.path.isdir(local) or PRESETS[dataset]["teacher"] is None else PRESETS[dataset]["teacher"]


def hub_reachable(timeout=3.0):
    """Fail fast offline instead of waiting out the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cached(source):
    try:
        BACKBONES["UNet2DModel"].load_config(source, local_files_only=True)
        return True
    except (OSError, ValueError):
        return False


def check_image_shape(backbone, dataset, source):
    """A teacher must make images of the preset's shape (a custom run takes the teacher's)."""
    got, want = image_shape(backbone), PRESETS[dataset]["shape"]
    if want is not None and tuple(got) != tuple(want):
        raise UserError(f"teacher '{source}' makes {'x'.join(map(str, got))} images but {dataset} is "
                        f"{'x'.join(map(str, want))}: pass the --dataset it was trained on, or a teacher for {dataset}")


def weights_hash(source):
    """sha256 (first 16 hex digits) of a teacher's weight file: pairs and students name their teacher by it."""
    folder = os.path.join(source, pipeline_subfolder(source) or "") if os.path.isdir(source) else source
    path = next((os.path.join(folder, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if path is None:  # a hub id: hash the cached file
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(source, "diffusion_pytorch_model.safetensors")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Denoiser: a teacher seen as x_t -> x̂0, with classifier-free guidance
# ---------------------------------------------------------------------------------------------
class Denoiser(nn.Module):
    """Wraps a backbone and its schedule. `x0(x_t, t, y, s)` is the teacher's estimate of the clean image. µfake
    also carries DMD2's GAN head (`head`), so that one optimiser and one data-parallel wrapper hold both."""

    def __init__(self, backbone, scheduler, head=None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.scheduler_config = scheduler.config
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
        """The backbone's bottleneck features (B, C, h, w): ContextUnet's down path alone, or UNet2DModel's
        mid-block output (through a whole forward: diffusers has no encoder-only call)."""
        if isinstance(self.backbone, ContextUnet):
            return self.backbone.encode(x_t)[-1]
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
        """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def target(self, x0, eps, t):
        """What the backbone is trained to output at (x_t, t): the teacher's own denoising objective."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.dtype)
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return x0


def make_dmd_networks(backbone, scheduler, gan_head=False, seed=0):
    """netG, µreal, µfake: three copies of µbase (µfake with DMD2's GAN head when `gan_head`, its initial weights
    drawn from `seed`, so runs repeat and every process starts alike). µreal is frozen; all three run in eval mode
    (dropout off, BatchNorm on running statistics) so an image never depends on its batch."""
    net_g = Denoiser(copy.deepcopy(backbone), scheduler).eval().requires_grad_(True)
    head = None
    if gan_head:
        with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
            torch.manual_seed(seed)
            head = DiscriminatorHead(bottleneck_channels(backbone), class_labels_of(backbone)[0])
    mu_fake = Denoiser(copy.deepcopy(backbone), scheduler, head).eval().requires_grad_(True)
    mu_real = Denoiser(backbone, scheduler).eval().requires_grad_(False)
    return net_g, mu_real, mu_fake


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
