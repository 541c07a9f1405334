"""Evaluate: FID of the one-step student vs the one-step teacher before distillation vs the multi-step teacher.

    python evaluate.py --fid                      # runs/mnist/{teacher,pairs,dmd} -> runs/mnist/eval/
    python evaluate.py --fid --full-ddpm          # also the full T-step ancestral DDPM teacher (slow on CPU)

Every row uses the same seeds, labels and number of samples. FID is computed by torch-fidelity against real
images of the dataset (its test split where there is one) on Inception features where those weights can be
had, else on the features of a classifier trained here on the real training data (cached in
<run-dir>/classifier/). The report names the extractor; the two kinds of FID are never comparable.
Writes report.json, report.md (table) and grid.png (one row per model, same seeds).
"""
import os
import statistics
import sys

import numpy as np
import torch
import torch_fidelity

from cli import UserError, keep_freed_memory, number, parse, run, script_parser
from data import load_dataset, save_grid
from files import CLASSIFIER, DMD, EVAL, PAIRS, STUDENT, STUDENT_EMA, atomic, load_json, write_json
from metrics import Uint8Images, register_classifier_features, train_classifier
from models import Denoiser, check_image_shape, default_teacher, load_teacher
from recipes import PRESETS, default_guidance, grid_columns
from sampling import generate


def main():
    p = script_parser(__doc__.split("\n")[0])
    p.add_argument("--fid", action="store_true", help="compute FID (the report's main number)")
    p.add_argument("--prepare", action="store_true", help="only train and cache the feature classifier (distill.py's quality probe uses it)")
    p.add_argument("--num-samples", type=number(int, 0), default=1000, help="samples per model (same seeds and labels for all)")
    p.add_argument("--batch-size", type=number(int, 0), default=64, help="generation batch; latency is measured per image at this batch")
    p.add_argument("--teacher", default=None, help="teacher folder or hub id; default as precompute.py")
    p.add_argument("--sampling-steps", type=number(int, 0), default=None, help="teacher DDIM steps; default the pairs' steps")
    p.add_argument("--guidance", type=number(float, 0, inclusive=True), default=None, help="teacher guidance; default the pairs'")
    p.add_argument("--full-ddpm", action="store_true", help="also evaluate ancestral DDPM over all T steps (slow)")
    p.add_argument("--feature-extractor", default="auto", choices=["auto", "inception", "classifier"],
                   help="auto: Inception if its weights load, else the trained classifier")
    p.add_argument("--inception-weights", default=None, help="local torch-fidelity Inception weights file (no download needed)")
    p.add_argument("--data-dir", default=None, help="dataset folder, as for train_teacher.py")
    p.add_argument("--num-reference", type=number(int, 0), default=10000, help="at most this many real reference images")
    p.add_argument("--classifier-epochs", type=number(int, 0), default=8, help="epochs to train the feature classifier")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parse(p)
    if not (args.fid or args.prepare):
        raise UserError("nothing to do: pass --fid (or --prepare to only make the feature classifier)")
    spec = PRESETS[args.dataset]
    out = os.path.join(args.run_dir, EVAL)
    teacher = args.teacher or default_teacher(args.dataset, args.run_dir)
    pairs_meta = os.path.join(args.run_dir, PAIRS, "meta.json")
    pairs = load_json(pairs_meta) if os.path.exists(pairs_meta) else {}
    steps = args.sampling_steps or pairs.get("sampling_steps", 25)
    s = args.guidance if args.guidance is not None else pairs.get("guidance", default_guidance(spec["num_classes"]))

    # --- reference images and the feature extractor
    real_train = load_dataset(args.dataset, args.data_dir, train=True)
    real_test = load_dataset(args.dataset, args.data_dir, train=False, verbose=False) if args.dataset != "celeba" else real_train
    n_ref = min(len(real_test), args.num_reference)
    reference = f"{args.dataset} {'test split' if real_test is not real_train else 'training images'} (first {n_ref})"
    ref_images = torch.stack([real_test[i][0] for i in range(n_ref)])
    clf_dir = os.path.join(args.run_dir, CLASSIFIER)
    clf = (train_classifier(real_train, real_test, clf_dir, spec["num_classes"], args.seed, args.classifier_epochs, args.dataset)
           if spec["num_classes"] or args.feature_extractor != "inception" else None)
    if args.prepare:
        return
    extractor = pick_extractor(args, clf_dir)

    # --- rows: same seeds and labels for every model
    models = [(f"teacher-ddim-{steps}", teacher, False, dict(steps=steps))]
    if args.full_ddpm:
        models.append((f"teacher-ddpm-{spec['T']}", teacher, False, dict(ddpm=True)))
    models.append(("onestep-before", teacher, True, {}))
    for name in (STUDENT, STUDENT_EMA):
        folder = os.path.join(args.run_dir, DMD, name)
        if os.path.isdir(folder):
            models.append((name.replace("_", "-"), folder, True, {}))
    rows, grid = [], []
    for name, source, one_step_model, kw in models:
        backbone, scheduler = load_teacher(source)
        check_image_shape(backbone, args.dataset, source)
        den = Denoiser(backbone, scheduler).to(args.device).eval()
        images, labels, seconds = generate(den, one_step_model, range(args.num_samples), args.seed, args.batch_size,
                                           kw.get("steps", steps), s, kw.get("ddpm", False), args.device)
        guided = s != 1.0 and den.num_classes and not one_step_model
        row = dict(model=name, nfe=1 if one_step_model else (spec["T"] if kw.get("ddpm") else steps) * (2 if guided else 1),
                   fid=fid(images, ref_images, extractor, args), class_accuracy=None,
                   ms_per_image=1000 * statistics.median(seconds[1:] or seconds) / args.batch_size)
        if clf is not None:
            f, logits = features(clf, images)
            if spec["num_classes"]:
                row["class_accuracy"] = (logits.argmax(1) == labels).float().mean().item()
            row["diversity"] = diversity(f, labels, *features(clf, ref_images)[:1], real_labels(real_test, n_ref))
        rows.append(row)
        grid.append(images[:grid_columns(spec["num_classes"])])
        print(f"{name}: FID {row['fid']:.2f}" + (f", accuracy {row['class_accuracy']:.1%}" if row["class_accuracy"] is not None else "")
              + f", {row['ms_per_image']:.2f} ms/image", file=sys.stderr)

    report = dict(dataset=args.dataset, feature_extractor=extractor["label"], num_samples=args.num_samples,
                  reference=reference, device=describe_device(args.device), guidance=s, seed=args.seed,
                  classifier_test_accuracy=clf.config.get("test_accuracy") if clf is not None else None, rows=rows)
    os.makedirs(out, exist_ok=True)
    write_json(report, os.path.join(out, "report.json"))
    md = markdown(report)
    with atomic(os.path.join(out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(md)
    save_grid(torch.cat(grid), os.path.join(out, "grid.png"), nrow=len(grid[0]))
    print(md)
    print(f"eval: {out}/report.json, report.md, grid.png (rows: {', '.join(r['model'] for r in rows)})")


def pick_extractor(args, clf_dir):
    """torch-fidelity keyword arguments for the feature extractor, and a label for the report."""
    if args.feature_extractor != "classifier":
        kw = dict(feature_extractor="inception-v3-compat", feature_layer_fid="2048",
                  feature_extractor_weights_path=args.inception_weights)
        try:
            torch_fidelity.utils.create_feature_extractor("inception-v3-compat", ["2048"], cuda=False, verbose=False,
                                                          feature_extractor_weights_path=args.inception_weights)
            return dict(kw, label="inception-v3-compat (pool3, 2048-d)", rgb=True)
        except Exception as e:
            if args.feature_extractor == "inception":
                raise UserError(f"Inception weights could not be loaded ({str(e)[:80]}): pass --inception-weights FILE or "
                    f"--feature-extractor classifier")
            print(f"notice: Inception weights unavailable ({type(e).__name__}); FID on the trained classifier's features "
                  f"(not comparable with Inception FID)", file=sys.stderr)
    register_classifier_features()
    return dict(feature_extractor="dmd-classifier", feature_layer_fid="penultimate", feature_extractor_weights_path=clf_dir,
                label=f"classifier penultimate features ({clf_dir})", rgb=False)


def fid(images, ref_images, extractor, args):
    kw = {k: v for k, v in extractor.items() if k not in ("label", "rgb")}
    m = torch_fidelity.calculate_metrics(input1=Uint8Images(images, extractor["rgb"]), input2=Uint8Images(ref_images, extractor["rgb"]),
                                         fid=True, cuda=args.device.startswith("cuda"), batch_size=256, verbose=False,
                                         save_cpu_ram=True, **kw)
    return m["frechet_inception_distance"]


@torch.no_grad()
def features(clf, images):
    out = [clf(images[i:i + 512].float()) for i in range(0, len(images), 512)]
    return torch.cat([f for f, _ in out]), torch.cat([l for _, l in out])


def real_labels(ds, n):
    return torch.as_tensor([ds[i][1] for i in range(n)])


def diversity(f, labels, f_real, labels_real):
    """tr Cov(generated features | class) / tr Cov(real | class), averaged over classes (1 = as diverse as real)."""
    if labels is None:
        return (f.var(0).sum() / f_real.var(0).sum()).item()
    ratios = [(f[labels == c].var(0).sum() / f_real[labels_real == c].var(0).sum()).item()
              for c in labels.unique() if (labels == c).sum() > 1 and (labels_real == c).sum() > 1]
    return float(np.mean(ratios))


def describe_device(device):
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def markdown(report):
    lines = [f"Dataset **{report['dataset']}**, {report['num_samples']} samples per model, reference: {report['reference']}.",
             f"FID features: {report['feature_extractor']}. Device: {report['device']}."]
    if report["classifier_test_accuracy"] is not None:
        lines.append(f"Feature classifier held-out accuracy: {report['classifier_test_accuracy']:.1%}.")
    lines += ["", "| model | NFE | FID | class accuracy | diversity | ms / image |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        acc = f"{r['class_accuracy']:.1%}" if r["class_accuracy"] is not None else "-"
        div = f"{r['diversity']:.2f}" if r.get("diversity") is not None else "-"
        lines.append(f"| {r['model']} | {r['nfe']} | {r['fid']:.2f} | {acc} | {div} | {r['ms_per_image']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    keep_freed_memory()  # CPU speed (cli.keep_freed_memory)
    run(main)
