"""Teacher backbones, teacher loading, the Denoiser wrapper and the three DMD networks.

Every backbone is called the diffusers way, `model(x_t, t, class_labels=y).sample`, and saves and
loads with `save_pretrained` / `from_pretrained`, so a teacher is one folder holding
`config.json` + `diffusion_pytorch_model.safetensors` (the backbone) and `scheduler_config.json`
(its DDPM noise schedule) - the same flat layout as the hub's google/ddpm-cifar10-32.

`python models.py` prints each dataset's teacher: architecture, parameter count, image shape, schedule.
"""
import argparse
import copy
import ctypes
import hashlib
import json
import os
import pickle
import shutil
import socket
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def keep_freed_memory():
    """CPU speed. glibc's malloc hands every large freed tensor back to the OS and page-faults it in again at the next
    allocation: on this project's 2-core CPU that was 13-22% of a teacher training step and ~40% of a DMD step at
    batch 64. Keep freed memory in the process instead (what jemalloc and tcmalloc do). Linux/glibc only;
    MALLOC_MMAP_MAX_ or MALLOC_TRIM_THRESHOLD_ in the environment mean the user chose, and are left alone."""
    if sys.platform != "linux" or {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap, not from mmap (which is unmapped on free)
    libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)  # and the heap's free top is kept, not trimmed


keep_freed_memory()  # every script, test and benchmark imports this module before it makes tensors


def die(msg):
    """Bad input: one line naming the problem and the fix, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def number(kind, low, inclusive=False):
    """An argparse type: a number of `kind` above `low` (at or above it when `inclusive`)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a {kind.__name__}")
        if value < low or (value == low and not inclusive) or value != value:
            raise argparse.ArgumentTypeError(f"{text} must be {'>=' if inclusive else '>'} {low}")
        return value
    return parse


def script_parser(description):
    """Every script's parser: --dataset and --run-dir, one-line errors with exit code 2."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: die(f"{msg} (see --help)")
    p.add_argument("--dataset", default="mnist", choices=list(DATASETS), help="which dataset and teacher")
    p.add_argument("--run-dir", default=None, help="run folder; default runs/<dataset>")
    p.add_argument("--seed", type=number(int, 0, inclusive=True), default=0, help="base seed (sample i uses seed+i)")
    return p


def finish_args(args):
    args.run_dir = args.run_dir or os.path.join("runs", args.dataset)
    return args


def write_json(obj, path):
    """Write-then-rename, so a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


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
    guidance: its one-hot row is all zeros.
    """

    @register_to_config
    def __init__(self, in_channels=1, n_feat=128, n_classes=10, sample_size=28, num_train_timesteps=400):
        super().__init__()
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

    def forward(self, sample, timestep, class_labels=None):
        B, n = sample.shape[0], self.config.n_feat
        if class_labels is None:  # unconditional = the null label
            class_labels = torch.full((B,), self.config.n_classes, device=sample.device)
        c = F.one_hot(class_labels.long(), self.config.n_classes + 1)[:, :-1].to(sample.dtype)
        t = torch.as_tensor(timestep, device=sample.device).expand(B).to(sample.dtype)
        t = (t / self.config.num_train_timesteps)[:, None]
        x = self.init_conv(sample)
        down1 = self.down1(x)
        down2 = self.down2(down1)
        up1 = self.up0(self.to_vec(down2))
        up2 = self.up1(self.contextembed1(c).view(B, 2 * n, 1, 1) * up1 + self.timeembed1(t).view(B, 2 * n, 1, 1), down2)
        up3 = self.up2(self.contextembed2(c).view(B, n, 1, 1) * up2 + self.timeembed2(t).view(B, n, 1, 1), down1)
        return UNet2DOutput(sample=self.out(torch.cat((up3, x), 1)))


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
# image shape (C, H, W), number of classes (0 = unconditional), schedule, default teacher.
DATASETS = {
    "mnist": dict(shape=(1, 28, 28), num_classes=10, T=400, beta_end=0.02, teacher=None),
    "celeba": dict(shape=(3, 64, 64), num_classes=0, T=1000, beta_end=0.02, teacher=None),
    "cifar10": dict(shape=(3, 32, 32), num_classes=0, T=1000, beta_end=0.02, teacher="google/ddpm-cifar10-32"),
}


def check_dataset(name):
    if name not in DATASETS:
        die(f"unknown dataset '{name}': use one of {', '.join(DATASETS)}")
    return DATASETS[name]


def make_teacher(dataset, prediction_type="epsilon", n_feat=128, unet=None):
    """A fresh (untrained) backbone and its DDPM scheduler. `unet` overrides the UNet2DModel config."""
    spec = check_dataset(dataset)
    if dataset == "mnist":
        backbone = ContextUnet(in_channels=1, n_feat=n_feat, n_classes=10, sample_size=28, num_train_timesteps=spec["T"])
    else:
        backbone = UNet2DModel(**{**(CIFAR10_UNET if dataset == "cifar10" else CELEBA_UNET), **(unet or {})})
    scheduler = DDPMScheduler(num_train_timesteps=spec["T"], beta_start=1e-4, beta_end=spec["beta_end"],
                              beta_schedule="linear", prediction_type=prediction_type, clip_sample=True)
    return backbone, scheduler


BACKBONES = {"ContextUnet": ContextUnet, "UNet2DModel": UNet2DModel}


def save_teacher(backbone, scheduler, folder):
    """Diffusers layout: saved to a temporary folder, then each file renamed into place (never half-written)."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.save_pretrained(tmp, safe_serialization=True)
    scheduler.save_pretrained(tmp)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(folder, f))
    os.rmdir(tmp)


def save_state(state, path):
    """A training state (tensors, numbers, lists, dicts only) for --resume; write-then-rename."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_state(path):
    """Load a training state safely: tensors and plain containers only, never arbitrary pickled objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        die(f"{path} holds pickled objects, which are refused for safety: use a state file written by this project")
    except (RuntimeError, EOFError) as e:
        die(f"{path} is unreadable ({str(e).splitlines()[0][:100]}): delete it and rerun without --resume")


def load_teacher(source):
    """(backbone, scheduler) from a local folder or a hub id, in eval mode on the CPU."""
    if os.path.isdir(source):
        if not any(os.path.isfile(os.path.join(source, f)) for f in WEIGHT_FILES):
            die(f"teacher folder '{source}' has no {WEIGHT_FILES[0]}: train one with "
                f"`python train_teacher.py` or pass --teacher FOLDER holding a saved teacher")
    elif os.path.exists(source) or source.startswith((".", "/")) or source.count("/") != 1:
        die(f"teacher '{source}' is neither a folder nor a hub id: train one with `python train_teacher.py` "
            f"or pass --teacher FOLDER")
    elif not hub_reachable() and not hub_cached(source):
        die(f"hub id '{source}' cannot be fetched without network: download it where there is a network "
            f"(`hf download {source} --local-dir DIR`) and pass --teacher DIR")
    try:
        config = BACKBONES["UNet2DModel"].load_config(source)
        cls = BACKBONES.get(config.get("_class_name"))
        if cls is None:
            die(f"teacher '{source}' is a {config.get('_class_name')}; supported backbones: {', '.join(BACKBONES)}")
        backbone = cls.from_pretrained(source)
        scheduler = DDPMScheduler.from_pretrained(source)
    except Exception as e:  # network down, missing files, truncated or foreign weights: one line, not a traceback
        if os.path.isdir(source):
            die(f"teacher folder '{source}' could not be loaded ({str(e).splitlines()[0][:150]}): "
                f"re-save it with `python train_teacher.py` or point --teacher at a complete folder")
        die(f"could not fetch hub id '{source}' ({str(e).splitlines()[0][:100]}): download it where there is a "
            f"network (`hf download {source} --local-dir DIR`) and pass --teacher DIR")
    return backbone.eval(), scheduler


def default_teacher(dataset, run_dir):
    """<run-dir>/teacher when it exists (or the dataset has no pretrained teacher), else the hub id."""
    local = os.path.join(run_dir, "teacher")
    return local if os.path.isdir(local) or DATASETS[dataset]["teacher"] is None else DATASETS[dataset]["teacher"]


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
    """A teacher must make images of the dataset's shape."""
    c = backbone.config
    size = c.sample_size if isinstance(c.sample_size, (tuple, list)) else (c.sample_size,) * 2
    got, want = (c.in_channels, *size), DATASETS[dataset]["shape"]
    if tuple(got) != tuple(want):
        die(f"teacher '{source}' makes {'x'.join(map(str, got))} images but {dataset} is {'x'.join(map(str, want))}: "
            f"pass the --dataset it was trained on, or a teacher for {dataset}")


def weights_hash(source):
    """sha256 (first 16 hex digits) of a teacher's weight file: pairs and students name their teacher by it."""
    path = next((os.path.join(source, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(source, f))), None)
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
    """Wraps a backbone and its schedule. `x0(x_t, t, y, s)` is the teacher's estimate of the clean image."""

    def __init__(self, backbone, scheduler):
        super().__init__()
        self.backbone = backbone
        self.scheduler_config = scheduler.config
        self.prediction_type = scheduler.config.prediction_type
        self.T = scheduler.config.num_train_timesteps
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.to(torch.float64), persistent=False)
        self.num_classes = getattr(backbone.config, "n_classes", 0)

    def forward(self, x_t, t, y=None):
        """The backbone's raw output (ε, v or x0, by prediction_type); y = None or the null label = unconditional."""
        return self.backbone(x_t, t, class_labels=y if self.num_classes else None).sample

    def guided(self, x_t, t, y=None, s=1.0):
        """Classifier-free guidance on the raw output, out_u + s (out_c - out_u); s = 1 means none.
        x̂0 is affine in the output for fixed (x_t, t), so this is the same as guiding x̂0."""
        if s == 1.0 or not self.num_classes:
            return self(x_t, t, y)
        null = torch.full_like(y, self.num_classes)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        out_c, out_u = self(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
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


@torch.no_grad()
def sample_teacher(denoiser, z, y=None, steps=25, s=1.0, ddpm=False, generator=None, progress=False):
    """Multi-step sampling from x_T = z with diffusers' schedulers on the teacher's own schedule.
    DDIM (eta = 0, deterministic; "trailing" spacing so the first step is t = T-1, where x_T = z lives;
    x̂0 clipped to [-1, 1] as the scheduler config says, and ε̂ recomputed from the clipped x̂0)
    or full ancestral DDPM (`ddpm=True`, every one of the T steps; randomness from `generator`)."""
    if ddpm:
        sched = DDPMScheduler.from_config(denoiser.scheduler_config)
        sched.set_timesteps(denoiser.T)
    else:
        sched = DDIMScheduler.from_config(denoiser.scheduler_config, timestep_spacing="trailing")
        sched.set_timesteps(steps)
    x = z
    for t in (tqdm(sched.timesteps, desc="sampling", leave=False) if progress else sched.timesteps):
        out = denoiser.guided(x, t.to(z.device), y, s)
        # use_clipped_model_output: with clip_sample, take ε̂ from the clipped x̂0, else guided steps diverge
        x = (sched.step(out, t, x, generator=generator) if ddpm else
             sched.step(out, t, x, eta=0.0, use_clipped_model_output=True)).prev_sample
    return x


def seeded_noise(indices, shape, seed):
    """z_i ~ N(0, I) from its own generator seeded seed + i: sample i never depends on batch or process."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + int(i))) for i in indices])


def balanced_labels(indices, num_classes):
    """Label i % num_classes (balanced classes); None for unconditional teachers."""
    return torch.as_tensor(indices, dtype=torch.long) % num_classes if num_classes else None


def one_step(denoiser, z, y=None):
    """The generator G(z, y): x̂0 of the network at t_gen = T-1 with x_t = z ~ N(0, I). One evaluation."""
    return denoiser.x0(z, denoiser.T - 1, y)


@torch.no_grad()
def generate(den, one_step_model, indices, seed, batch_size, steps=25, s=1.0, ddpm=False, device="cpu"):
    """Images in [-1, 1] (CPU), labels (or None) and seconds per batch for sample indices: noise seed+i, label
    i % num_classes. One-step models (student, teacher before distillation) take one evaluation, else DDIM/DDPM."""
    images, labels, seconds = [], [], []
    indices = list(indices)
    shape = (den.backbone.config.in_channels, *(den.backbone.config.sample_size,) * 2)
    for i in tqdm(range(0, len(indices), batch_size), desc="one-step" if one_step_model else "multi-step", leave=False):
        idx = indices[i:i + batch_size]
        z, y = seeded_noise(idx, shape, seed).to(device), balanced_labels(idx, den.num_classes)
        y_dev = y.to(device) if y is not None else None
        sync(device)
        t0 = time.perf_counter()
        if one_step_model:
            x = one_step(den, z, y_dev)
        else:
            x = sample_teacher(den, z, y_dev, steps, s, ddpm, torch.Generator(device).manual_seed(seed + idx[0]))
        sync(device)
        seconds.append(time.perf_counter() - t0)
        images.append(x.float().cpu())
        labels.append(y)
    return torch.cat(images), (torch.cat(labels) if den.num_classes else None), seconds


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def make_dmd_networks(backbone, scheduler):
    """netG, µreal, µfake: three copies of µbase. µreal is frozen; all three run in eval mode
    (dropout off, BatchNorm on running statistics) so an image never depends on its batch."""
    net_g = Denoiser(copy.deepcopy(backbone), scheduler).eval().requires_grad_(True)
    mu_fake = Denoiser(copy.deepcopy(backbone), scheduler).eval().requires_grad_(True)
    mu_real = Denoiser(backbone, scheduler).eval().requires_grad_(False)
    return net_g, mu_real, mu_fake


def count_params(model):
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    for name, spec in DATASETS.items():
        backbone, scheduler = make_teacher(name)
        c = scheduler.config
        print(f"{name:8s} {type(backbone).__name__:12s} {count_params(backbone):>11,d} params  "
              f"image {'x'.join(map(str, spec['shape']))}  {'class-conditional' if spec['num_classes'] else 'unconditional'}  "
              f"DDPM T={c.num_train_timesteps} linear beta {c.beta_start:g}->{c.beta_end:g}  "
              f"teacher: {spec['teacher'] or 'train_teacher.py'}")
