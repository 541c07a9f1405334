"""Every per-dataset default in one table, each value with its source.

Sources: [seed] the source report's table (docs/ALGORITHM.md, "Sources"); [teacher] the teacher's own code or model
card; [data] the dataset's own documentation; [DMD2] Yin et al. 2024 and its code (tianweiy/DMD2); [here] measured on this project's machine
(docs/RESULTS.md). A script's flag, where given, always wins over the table.
"""
import json
import os

PRESETS = {
    "mnist": dict(
        shape=(1, 28, 28), num_classes=10,  # [seed] class-conditional MNIST
        T=400, beta_end=0.02,  # [teacher] TeaPearce/Conditional_Diffusion_MNIST: 400 steps, linear β 1e-4 → 0.02
        teacher=None,  # no pretrained teacher to download: train_teacher.py makes one
        num_pairs=12800, lr=5e-6, steps=2000,  # [seed] pairs, lr of netG and µfake, steps at batch 64
    ),
    "fashion-mnist": dict(  # Xiao et al. 2017: MNIST's format with textures and within-class variety MNIST lacks
        shape=(1, 28, 28), num_classes=10,
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"),  # [data] the dataset's label order
        T=400, beta_end=0.02,  # [here] MNIST's teacher and schedule: the same ContextUnet, trained by train_teacher.py
        teacher=None,
        num_pairs=12800, lr=5e-6, steps=2000,  # [seed] MNIST's row (the seed has no Fashion-MNIST)
    ),
    "celeba": dict(
        shape=(3, 64, 64), num_classes=0,  # [seed] unconditional faces; 64x64 is our choice
        T=1000, beta_end=0.02,  # [seed] 1000 steps, linear β 1e-4 → 2e-2
        teacher=None,  # [seed] "our model": trained by train_teacher.py
        num_pairs=12800, lr=5e-6, steps=2000,  # [seed]
    ),
    "cifar10": dict(
        shape=(3, 32, 32), num_classes=0,  # [teacher] google/ddpm-cifar10-32 is unconditional
        T=1000, beta_end=0.02,  # [teacher] its scheduler_config.json
        teacher="google/ddpm-cifar10-32",  # [seed] the hub teacher
        num_pairs=4864, lr=1e-6, steps=1520,  # [seed]
    ),
    "custom": dict(  # your own teacher (--teacher, any diffusers UNet) and images (--data-dir): no --dataset
        shape=None, num_classes=None, T=None,  # read from the teacher's own config
        teacher=None,  # --teacher is required
        num_pairs=12800, lr=5e-6, steps=2000,  # [seed] the MNIST / CelebA row
    ),
}


def dataset_name(dataset, teacher=None, image_size=None):
    """--dataset when given; else the preset a --teacher was made for (preset_of); else "custom" when your own teacher
    (or, to train one, an image size) is given: shape, classes and schedule then come from the teacher; else the
    embedded default, MNIST."""
    return dataset or preset_of(teacher) or ("custom" if teacher or image_size else "mnist")


def preset_of(teacher):
    """The preset a teacher was made for, else None: a preset's hub id, or a folder that train_teacher.py wrote for a
    preset (its train_config.json records the dataset). Such a teacher is no stranger: read as "custom" it would miss
    its preset's data and run folder (runs/mnist/teacher would look for its students in runs/custom)."""
    hub_ids = {spec["teacher"]: name for name, spec in PRESETS.items() if spec["teacher"]}
    if teacher is None or teacher in hub_ids:
        return hub_ids.get(teacher)
    record = os.path.join(teacher, "train_config.json")
    if not os.path.isfile(record):
        return None
    with open(record) as f:
        name = json.load(f).get("dataset")
    return name if name in PRESETS and name != "custom" else None


def default_guidance(guidable):
    """Classifier-free guidance scale s when none is given: 2 for teachers with an unconditional (null) class,
    1 (none) for the others."""
    return 2.0 if guidable else 1.0


def grid_columns(num_classes):
    """Sample grids: one column per class where there are few classes (one row = 0..9 on MNIST), else 8."""
    return num_classes if 0 < num_classes <= 16 else 8
