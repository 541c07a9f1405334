"""Image quality measured with torch-fidelity: the feature extractor (Inception where its weights can be had, else a
small classifier trained here on the real data), FID and KID from the library's own functions on those features,
precision and recall as its function computes them but with the real set's part computed once (`Reference`), and the
quality probe that distill.py runs during training.

The classifier's features are registered with torch-fidelity as the extractor "dmd-classifier" by
`register_classifier_features()`, so both kinds of features go through the same library code. The two kinds of FID
are never comparable: every report names its extractor.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_fidelity
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.defaults import DEFAULTS
from torch_fidelity.metric_prc import calc_cdist_part
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from cli import UserError, progress
from data import to_uint8, to_unit
from files import EVAL, load_json, save_folder
from sampling import balanced_labels, sample_generator, seeded_noise

CLASSIFIER_FEATURES = "dmd-classifier"
PRC_BATCH = DEFAULTS["prc_batch_size"]  # torch-fidelity's rows (and columns) per distance block


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


class Uint8Images(Dataset):
    """Images in [-1, 1] -> uint8 (C, H, W) tensors, the input torch-fidelity takes; grey -> 3 channels if asked."""

    def __init__(self, images, rgb=False):
        self.u8 = to_uint8(images)
        self.rgb = rgb

    def __len__(self):
        return len(self.u8)

    def __getitem__(self, i):
        x = self.u8[i]
        return x.expand(3, -1, -1) if self.rgb and x.shape[0] == 1 else x


class ClassifierFeatures(torch_fidelity.FeatureExtractorBase):
    """The cached classifier's penultimate features (and logits), as a torch-fidelity feature extractor."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = Classifier.from_pretrained(feature_extractor_weights_path).eval()

    @staticmethod
    def get_provided_features_list():
        return ("penultimate", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "penultimate"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return None

    def forward(self, x):  # uint8 (B, C, H, W)
        f, logits = self.net(x.float() / 127.5 - 1)
        return tuple({"penultimate": f, "logits": logits}[k] for k in self.features_list)


def register_classifier_features():
    """Make "dmd-classifier" known to torch-fidelity (once per process)."""
    if CLASSIFIER_FEATURES not in torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(CLASSIFIER_FEATURES, ClassifierFeatures)


def train_classifier(train, test, folder, num_classes, seed=0, epochs=8, dataset=None):
    """Train (once, then cached in `folder`) the small CNN on real data: on the classes where there are some, else on
    predicting which of 4 rotations was applied."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return Classifier.from_pretrained(folder).eval()
    labelled = num_classes > 0
    torch.manual_seed(seed)  # its initial weights: else each run gets another feature space, so another FID scale
    net = Classifier(in_channels=train[0][0].shape[0], num_outputs=num_classes if labelled else 4)
    net.to(memory_format=torch.channels_last)  # its training steps took 0.64-0.69x the time on CPU (oneDNN; docs/RESULTS.md)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(train, batch_size=128, shuffle=True, generator=gen)
    for epoch in progress(range(epochs), desc="classifier"):
        net.train()
        for x, y in loader:
            x, y = task_batch(x, y, labelled, gen)
            loss = F.cross_entropy(net(x)[1], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().to(memory_format=torch.contiguous_format)  # scored, saved and used in the layout it is loaded in
    correct = n = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=256):
            x, y = task_batch(x, y, labelled, gen)
            correct += (net(x)[1].argmax(1) == y).sum().item()
            n += len(y)
    net.register_to_config(test_accuracy=correct / n, task="classes" if labelled else "rotation", dataset=dataset)
    save_folder(folder, net)
    print(f"classifier: {'class' if labelled else 'rotation'} accuracy {correct / n:.1%} on {n} held-out images -> {folder}",
          file=sys.stderr)
    return net


def task_batch(x, y, labelled, gen):
    if labelled:
        return x, y
    k = torch.randint(0, 4, (len(x),), generator=gen)
    return torch.stack([torch.rot90(xi, int(ki), (1, 2)) for xi, ki in zip(x, k)]), k


# ---------------------------------------------------------------------------------------------
# Features and scores
# ---------------------------------------------------------------------------------------------
def feature_extractor(choice, classifier_dir, inception_weights=None, device="cpu"):
    """(torch-fidelity extractor, the feature layer, a label for reports, whether grey images go in as RGB).
    `choice`: "inception", "classifier", or "auto" = Inception if its weights load, else the classifier."""
    cuda = str(device).startswith("cuda")
    if choice != "classifier":
        try:
            fe = create_feature_extractor("inception-v3-compat", ["2048"], cuda=cuda, verbose=False,
                                          feature_extractor_weights_path=inception_weights)
            return fe, "2048", "inception-v3-compat (pool3, 2048-d)", True
        except Exception as e:
            if choice == "inception":
                raise UserError(f"Inception weights could not be loaded ({str(e)[:80]}): pass --inception-weights FILE or "
                                f"--feature-extractor classifier")
            print(f"notice: Inception weights unavailable ({type(e).__name__}); FID on the trained classifier's features "
                  f"(not comparable with Inception FID)", file=sys.stderr)
    register_classifier_features()
    fe = create_feature_extractor(CLASSIFIER_FEATURES, ["penultimate"], cuda=cuda, verbose=False,
                                  feature_extractor_weights_path=classifier_dir)
    return fe, "penultimate", f"classifier penultimate features ({classifier_dir})", False


def extract(fe, layer, images, rgb, device="cpu"):
    """Features (N, d) of images in [-1, 1], as torch-fidelity computes them (uint8 input: clipped and quantised like
    any saved image)."""
    return get_featuresdict_from_dataset(Uint8Images(images, rgb), fe, batch_size=256, cuda=str(device).startswith("cuda"),
                                         save_cpu_ram=True, verbose=False)[layer]


@torch.no_grad()
def class_accuracy(clf, images, labels, label_classes=None):
    """The fraction of images that the classifier assigns to the class they were generated for: their label, or for a
    text-to-image teacher the class of their prompt (`label_classes[label]`; prompts of no class are left out)."""
    if label_classes is not None:
        classes = torch.as_tensor(label_classes)[labels.cpu()]
        images, labels = images[classes >= 0], classes[classes >= 0]
        if not len(labels):
            return None
    logits = torch.cat([clf(to_unit(to_uint8(x)))[1] for x in images.split(500)])  # as saved: clipped, quantised
    return (logits.argmax(1) == labels).float().mean().item()


class Reference:
    """The real features every row of a report is scored against, with what depends on them alone computed once:
    FID's mean and covariance, and each real sample's distance to its k-th nearest real neighbour (the radius of its
    ball in precision). torch-fidelity's prc_features_to_metric recomputes those radii on every call: against
    10,000 real features that was 2.05 of its 2.24 s (1 thread), so about 30 s over the yardstick's 15 rows (an
    estimate from that call's time; the library takes no precomputed radii)."""

    def __init__(self, features, k=3):
        self.features, self.k = features, k
        self.statistics = fid_features_to_statistics(features.double())
        self.radii = kth_neighbour_distance(features, k)


def kth_neighbour_distance(f, k):
    """Each row's distance to its k-th nearest other row, as torch-fidelity computes it (its cdist, k + 1 counting
    the row itself)."""
    return torch.cat([calc_cdist_part(part, f, PRC_BATCH).kthvalue(k + 1).values for part in f.split(PRC_BATCH)])


def inside_any_ball(f, centres, radii):
    """Share of the rows of f within radius[j] of some centres[j] (Kynkäänniemi et al., 2019)."""
    return torch.cat([(calc_cdist_part(part, centres, PRC_BATCH) <= radii).any(dim=1).float()
                      for part in f.split(PRC_BATCH)])


def scores(f, ref):
    """FID, KID (mean and its std over subsets), precision and recall (Kynkäänniemi et al., k = 3) of features `f`
    against the real features `ref` (a Reference, or a tensor of them), from torch-fidelity's own functions; precision
    and recall as its prc_features_to_metric computes them (the test holds them equal), on the cached radii."""
    ref = ref if isinstance(ref, Reference) else Reference(ref)
    fid = fid_statistics_to_metric(fid_features_to_statistics(f.double()), ref.statistics,
                                   False)["frechet_inception_distance"]
    kid = kid_features_to_metric(f, ref.features, kid_subset_size=min(1000, len(f), len(ref.features)), verbose=False)
    precision, recall = precision_recall(f, ref)
    return dict(fid=float(fid), kid=kid["kernel_inception_distance_mean"], kid_std=kid["kernel_inception_distance_std"],
                precision=precision, recall=recall)


def precision_recall(f, ref):
    """Precision: the share of G's samples inside some real sample's ball; recall: the share of real samples inside
    some of G's (each ball reaching to its k-th nearest neighbour in its own set)."""
    precision = inside_any_ball(f, ref.features, ref.radii).mean().item()
    recall = inside_any_ball(ref.features, f, kth_neighbour_distance(f, ref.k)).mean().item()
    return precision, recall


def high_frequency_share(images, cutoff=0.25):
    """The share of a set's spectral power above `cutoff` cycles per pixel (half the Nyquist frequency by default),
    after removing the set's mean image: the texture and fine detail of the images' variations. A generator that
    makes one flat image per class reads far below real data (Fashion-MNIST: 0.12). images: (N, C, H, W)."""
    x = images.double() - images.double().mean(0, keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2).sum(dim=(0, 1))  # (H, W)
    fy, fx = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64), torch.fft.fftfreq(x.shape[-1], dtype=torch.float64)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    return (power[radius > cutoff].sum() / power.sum()).item()


def is_teacher_ddim(name):
    """A report row of the teacher sampled by DDIM (teacher-g<s>-ddim-<n>, or teacher-ddim-<n> unguided): the rows
    a student's gap is read against."""
    return name.startswith("teacher-") and "-ddim-" in name


def best_teacher_row(run_dir, teacher_hash):
    """The teacher's best DDIM row over steps x guidance in <run_dir>/eval/report.json if evaluate.py made it for this
    very teacher (by its weights' hash), or None: no report yet (`evaluate.py --fid --rows real,teacher` makes one),
    or one of another teacher."""
    report_path = os.path.join(run_dir, EVAL, "report.json")
    if not os.path.isfile(report_path):
        return None
    report = load_json(report_path)
    rows = [r for r in report["rows"] if is_teacher_ddim(r["model"])]
    if report.get("setup", {}).get("teacher_hash") != teacher_hash or not rows:
        return None
    return min(rows, key=lambda r: r["fid"])


def required_best_teacher_row(run_dir, teacher_hash, flag, otherwise):
    """best_teacher_row for a flag that cannot do without it (`otherwise`: the flags to give instead)."""
    best = best_teacher_row(run_dir, teacher_hash)
    if best is None:
        raise UserError(f"{flag} needs this teacher's evaluation in {run_dir}/{EVAL}/report.json: run `python "
                        f"evaluate.py --fid --rows real,teacher` first, or give {otherwise}")
    return best


def make_probe(classifier_dir, real, num_samples, seed, shape, num_classes, timesteps, device, decode=None,
               label_classes=None):
    """A Probe, or None where `evaluate.py --prepare` has not made the classifier yet."""
    if not os.path.isfile(os.path.join(classifier_dir, "config.json")):
        print(f"notice: no {classifier_dir}; quality probe off (make it with `python evaluate.py --prepare`)",
              file=sys.stderr)
        return None
    return Probe(classifier_dir, real, num_samples, seed, shape, num_classes, timesteps, device, decode, label_classes)


class Probe:
    """A cheap quality probe for training: FID, precision, recall, high-frequency share and class accuracy of
    `num_samples` images of the generator (at its `timesteps`) on fixed seeds (disjoint from the pairs' and
    evaluation's), against the real images `real` (precision and recall: the first 1,000 of them), on the classifier's
    features, the way evaluate.py computes them: a collapse shows in recall before FID. With `set_gap_reference`, also the share of the gap
    between the teacher's best evaluated row and the real floor that the generator closes, all three measured here,
    on the probe's seeds and sample count (an FID's level depends on the sample count: the evaluation's numbers are not
    on this scale). `decode`: a latent teacher's latents -> images (Denoiser.decode); None for pixels.
    `label_classes`: a text-to-image teacher's class of each label (prompt), -1 for none (data.prompt_classes)."""

    def __init__(self, classifier_dir, real, num_samples, seed, shape, num_classes, timesteps, device, decode=None,
                 label_classes=None):
        self.fe, self.layer, _, _ = feature_extractor("classifier", classifier_dir, device=device)
        self.clf = Classifier.from_pretrained(classifier_dir).eval()
        self.device, self.timesteps, self.num_samples = device, timesteps, num_samples
        x_real = torch.stack([real[i][0] for i in range(min(len(real), 10000))])
        f_real = extract(self.fe, self.layer, x_real, False, device)
        self.fid_statistics = fid_features_to_statistics(f_real.double())  # FID against all of them (up to 10,000)
        self.prc_ref = Reference(f_real[:1000])  # precision and recall against the first 1,000
        self.noise = seeded_noise(range(num_samples), shape, seed, len(timesteps))
        self.y = balanced_labels(range(num_samples), num_classes)
        self.gap_reference = None
        self.decode = decode or (lambda x: x)
        self.label_classes = label_classes

    def fid(self, x, features=None):
        f = extract(self.fe, self.layer, x, False, self.device) if features is None else features
        return float(fid_statistics_to_metric(fid_features_to_statistics(f.double()), self.fid_statistics,
                                              False)["frechet_inception_distance"])

    def batches(self, make):
        """make(z, y) on the probe's noise (its first draw) and labels, 250 at a time, decoded, concatenated on the
        CPU."""
        z = self.noise if self.noise.dim() == 4 else self.noise[0]
        return torch.cat([self.decode(make(z[i:i + 250].to(self.device), self.y[i:i + 250].to(self.device)
                                           if self.y is not None else None)).cpu() for i in range(0, self.num_samples, 250)])

    @torch.no_grad()
    def set_gap_reference(self, name, teacher, real_train):
        """The gap's two ends on the probe's scale: `teacher(z, y)` (the teacher's best row as evaluate.py found it,
        named `name`) on the probe's seeds, and as many real training images (the floor), drawn at random: a dataset
        may be sorted by class."""
        draw = torch.randperm(len(real_train), generator=torch.Generator().manual_seed(0))[:self.num_samples]
        x_real = torch.stack([real_train[int(i)][0] for i in draw])
        self.gap_reference = dict(model=name, probe_fid=self.fid(self.batches(teacher)), real_probe_fid=self.fid(x_real))

    @torch.no_grad()
    def __call__(self, net_g):
        """probe_fid (and probe_acc, and probe_gap) of the generator's images; a K-step generator also gets
        probe_fid_k<k>, the FID of its x̂0 after each earlier step k (where a collapse starts shows there)."""
        chunks = [sample_generator(net_g, self.noise[..., i:i + 250, :, :, :].to(self.device),
                                   self.y[i:i + 250].to(self.device) if self.y is not None else None, self.timesteps,
                                   every_step=True)
                  for i in range(0, self.num_samples, 250)]
        steps = [torch.cat([self.decode(c[k]).cpu() for c in chunks]) for k in range(len(self.timesteps))]
        x = steps[-1]
        f = extract(self.fe, self.layer, x, False, self.device)
        precision, recall = precision_recall(f, self.prc_ref)
        row = dict(probe_fid=self.fid(x, f), probe_precision=precision, probe_recall=recall,
                   probe_hf=high_frequency_share(x.clamp(-1, 1)),
                   **{f"probe_fid_k{k}": self.fid(x_k) for k, x_k in enumerate(steps[:-1])})
        if self.gap_reference:
            teacher, real = self.gap_reference["probe_fid"], self.gap_reference["real_probe_fid"]
            row["probe_gap"] = (teacher - row["probe_fid"]) / (teacher - real) if teacher > real else None
        if self.y is not None:
            row["probe_acc"] = class_accuracy(self.clf, x, self.y, self.label_classes)
        return row
