"""Image quality measured with torch-fidelity: the feature extractor (Inception where its weights can be had, else a
small classifier trained here on the real data), and the quality probe that distill.py runs during training.

The classifier's features are registered with torch-fidelity as the extractor "dmd-classifier" by
`register_classifier_features()`, so both kinds of FID go through the same library code.
"""
import os
import sys

import torch
import torch.nn.functional as F
import torch_fidelity
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from tqdm import tqdm

from data import to_uint8, to_unit
from files import save_folder
from models import Classifier
from sampling import balanced_labels, one_step, seeded_noise

CLASSIFIER_FEATURES = "dmd-classifier"


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
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(train, batch_size=128, shuffle=True, generator=gen)
    for epoch in tqdm(range(epochs), desc="classifier"):
        net.train()
        for x, y in loader:
            x, y = task_batch(x, y, labelled, gen)
            loss = F.cross_entropy(net(x)[1], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
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


def make_probe(classifier_dir, real, num_samples, seed, shape, num_classes, device):
    """A cheap quality probe for training, or None where `evaluate.py --prepare` has not made the classifier yet: FID
    and class accuracy of `num_samples` one-step images on fixed seeds, against the real images `real`, on the
    classifier's features."""
    if not os.path.isfile(os.path.join(classifier_dir, "config.json")):
        print(f"notice: no {classifier_dir}; quality probe off (make it with `python evaluate.py --prepare`)",
              file=sys.stderr)
        return None
    clf = Classifier.from_pretrained(classifier_dir).eval().to(device)
    with torch.no_grad():
        x_real = torch.stack([real[i][0] for i in range(min(len(real), 10000))]).to(device)
        ref = fid_features_to_statistics(torch.cat([clf(c)[0] for c in x_real.split(500)]).cpu().double())
    z = seeded_noise(range(num_samples), shape, seed).to(device)
    y = balanced_labels(range(num_samples), num_classes)

    @torch.no_grad()
    def probe(net_g):
        x = torch.cat([one_step(net_g, zc, yc.to(device) if yc is not None else None)
                       for zc, yc in zip(z.split(250), y.split(250) if y is not None else [None] * len(z.split(250)))])
        f, logits = clf(to_unit(to_uint8(x)))  # the images as saved: clipped to [-1, 1] and quantised, as evaluate.py sees them
        fid = fid_statistics_to_metric(fid_features_to_statistics(f.cpu().double()), ref, False)["frechet_inception_distance"]
        acc = (logits.argmax(1).cpu() == y).float().mean().item() if y is not None else None
        return dict(probe_fid=float(fid), **({"probe_acc": acc} if acc is not None else {}))
    return probe
