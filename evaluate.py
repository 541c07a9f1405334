"""Evaluate: the one-step student against the multi-step teacher at several step counts, the one-step teacher before
distillation, and real data, on the same held-out seeds.

    python evaluate.py --fid                      # runs/mnist/{teacher,pairs,dmd} -> runs/mnist/eval/
    python evaluate.py --fid --repeats 3          # FID as mean ± std over 3 disjoint seed sets
    python evaluate.py --fid --full-ddpm          # also the full T-step ancestral DDPM teacher (slow on CPU)
    python evaluate.py --fid --rows real,teacher --teacher-guidance 1.5,2,3,4,5   # the teacher alone, a wider grid

Noise seeds are held out: they never overlap the pairs' (the student was trained to reproduce those) or the training
probe's, and every row uses the same seeds, labels and number of samples. A `real` row (real training images against
the same reference) is the metric's floor. The teacher is scored over a grid of DDIM step counts x guidance scales, and
a student is read against the BEST of those rows (its "gap closed"), not against the teacher at the student's own
guidance. Where that best row lies on an edge of the grid, rows past the edge are scored (twice the steps, guidance one
spacing further) until it has a worse neighbour on every side (--extend-rows), so that it is the teacher's minimum. FID, KID, precision and recall come from torch-fidelity (precision and recall on the real set's radii,
cached by metrics.Reference) on Inception features where those weights can be had, else on the features of a
classifier trained here on the real training data (cached in <run-dir>/classifier/); the report names the extractor,
and the two kinds are never comparable.
Writes report.json, report.md (table), grid.png (one row per model, same seeds) and fid_vs_nfe.png, all of them only
once every row has been measured: a failed or interrupted evaluation leaves the previous report as it was.
"""
import functools
import hashlib
import os
import shutil
import statistics
import sys
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch

from cli import UserError, keep_freed_memory, number, parse, run, script_parser
from data import class_names_of_data, load_splits, prompt_classes, read_prompts, to_uint8
from files import CLASSIFIER, DMD, EVAL, PAIRS, PIPELINE, STUDENT, STUDENT_BEST, STUDENT_EMA, atomic, load_json, write_json
from metrics import (Reference, class_accuracy, extract, feature_extractor, high_frequency_share, is_teacher_ddim,
                     scores, train_classifier)
from checkpoints import default_teacher, open_teacher, student_timesteps, weights_hash, write_model_card
from models import check_guidance
from recipes import PRESETS, default_guidance, grid_columns
from sampling import EVAL_SEED, PROBE_SEED, generate, one_step, sample_generator, sample_teacher

METRICS = ("fid", "kid", "precision", "recall", "class_accuracy", "hf_share")


def main():
    p = script_parser(__doc__.split("\n")[0])
    p.set_defaults(seed=None)
    p.add_argument("--fid", action="store_true", help="compute the report: FID, KID, precision, recall, accuracy, latency")
    p.add_argument("--prepare", action="store_true", help="only train and cache the feature classifier (distill.py's quality probe uses it)")
    p.add_argument("--num-samples", type=number(int, 0), default=1000, help="samples per model and repeat (same seeds and labels for all)")
    p.add_argument("--repeats", type=number(int, 0), default=1, help="disjoint seed sets; metrics are mean ± std over them")
    p.add_argument("--batch-size", type=number(int, 0), default=64, help="generation batch; latency is measured per image at this batch")
    p.add_argument("--teacher", default=None, help="teacher folder or hub id; default as precompute.py")
    p.add_argument("--ddim-steps", type=number_list(int), default=[2, 4, 8],
                   help="teacher DDIM step counts at each guidance (the FID-vs-NFE curves; the pairs' steps are added "
                        "at theirs; 1 step is the onestep-before-guided row)")
    p.add_argument("--guidance", type=number(float, 0, inclusive=True), default=None,
                   help="the guidance the student was distilled at (its own): default the pairs', else dmd/config.json's")
    p.add_argument("--teacher-guidance", type=number_list(float), default=None,
                   help="guidance scales the teacher is also scored at, so a student is read against the teacher at its "
                        "best; default: --guidance and two around it, 1 + (s-1)/2 and s + (s-1)/2 (3 -> 2,3,4)")
    p.add_argument("--extend-rows", type=number(int, 0, inclusive=True), default=10,
                   help="where the teacher's best row lies on an edge of the grid (its largest or smallest step count or "
                        "guidance), score up to this many rows past it until the best has a worse neighbour on every "
                        "side: a gap read against the grid's edge flatters the student; 0 = the grid alone")
    p.add_argument("--full-ddpm", action="store_true", help="also evaluate ancestral DDPM over all T steps (slow)")
    p.add_argument("--rows", type=lambda s: tuple(s.split(",")), default=None,
                   help="only the rows whose names start with one of these, e.g. real,student (default: all)")
    p.add_argument("--feature-extractor", default="auto", choices=["auto", "inception", "classifier"],
                   help="auto: Inception if its weights load, else the trained classifier")
    p.add_argument("--inception-weights", default=None, help="local torch-fidelity Inception weights file (no download needed)")
    p.add_argument("--data-dir", default=None, help="dataset folder, as for train_teacher.py")
    p.add_argument("--prompts", default=None,
                   help="a text-to-image teacher: the prompts every row is made for, one a line, sample i for prompt "
                        "i %% their number (held out from distillation: write_captions.py's eval_prompts.txt); class "
                        "accuracy scores each image against the data's class its prompt names")
    p.add_argument("--num-reference", type=number(int, 0), default=10000, help="at most this many real reference images")
    p.add_argument("--classifier-epochs", type=number(int, 0), default=8, help="epochs to train the feature classifier")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--rescore", action="store_true",
                   help="score every row again; by default the rows that do not depend on a student (real, teacher, "
                        "one-step teacher) are taken from the previous report when it was made with the same teacher, "
                        "classifier, reference, seeds and sample count")
    args = parse(p)
    if not (args.fid or args.prepare):
        raise UserError("nothing to do: pass --fid (or --prepare to only make the feature classifier)")
    out = os.path.join(args.run_dir, EVAL)
    teacher = args.teacher or default_teacher(args.dataset, args.run_dir)
    prompts = read_prompts(args.prompts)
    teacher_den, _ = open_teacher(teacher, args.dataset, 1.0, args.device, prompts)  # what it makes: shape, classes, T
    num_classes = teacher_den.num_classes  # the labels its samples are made for: classes, or prompts
    pairs_meta, dmd_config = os.path.join(args.run_dir, PAIRS, "meta.json"), os.path.join(args.run_dir, DMD, "config.json")
    pairs = load_json(pairs_meta) if os.path.exists(pairs_meta) else {}
    distilled = load_json(dmd_config) if os.path.exists(dmd_config) else {}
    if args.guidance is None:  # the student's: µreal's in its distillation, else the pairs', else the default
        args.guidance = distilled.get("guidance", pairs.get("guidance", default_guidance(teacher_den.null_label is not None)))
    s = args.guidance
    check_guidance(teacher_den, s, teacher)
    guidable = teacher_den.null_label is not None
    guidances = teacher_guidance_grid(s, args.teacher_guidance, guidable)
    if args.teacher_guidance and guidances == [1.0] and args.teacher_guidance != [1.0]:
        print(f"notice: '{teacher}' has no unconditional class: the teacher rows are unguided (--teacher-guidance "
              f"ignored)", file=sys.stderr)
    seeds = held_out_seeds(args, pairs, distilled)
    rows_to_run = select_rows(all_rows(args, teacher, pairs, s, guidances, teacher_den), args.rows)  # before any work

    # --- reference images, the feature classifier, the extractor
    real_train, real_test, what = load_splits(args.dataset, args.data_dir, True, teacher_den.image_shape,
                                              None if prompts else num_classes)
    # the classifier's classes are the data's; a text-to-image teacher's samples are scored against their prompt's
    data_classes = len(class_names_of_data(args.dataset, real_train)) if prompts else num_classes
    label_classes = prompt_classes(prompts, class_names_of_data(args.dataset, real_train)) if prompts else None
    n_ref = min(len(real_test), args.num_reference)
    reference = f"{args.dataset} {what} (first {n_ref})"
    clf_dir = os.path.join(args.run_dir, CLASSIFIER)
    clf = (train_classifier(real_train, real_test, clf_dir, data_classes, args.seed or 0, args.classifier_epochs,
                            args.dataset) if data_classes or args.feature_extractor != "inception" else None)
    if args.prepare:
        return
    fe, layer, label, rgb = feature_extractor(args.feature_extractor, clf_dir, args.inception_weights, args.device)
    x_ref = torch.stack([real_test[i][0] for i in range(n_ref)])
    ref = Reference(extract(fe, layer, x_ref, rgb, args.device))  # scored against by every row
    N, R = args.num_samples, args.repeats
    # what the rows' numbers depend on, by content, not by folder: the extractor by its layer (the classifier by its
    # hash below), so a run folder moved or copied (a seed sweep beside the demo's) reuses its teacher rows
    setup = dict(teacher_hash=weights_hash(teacher), feature_extractor=layer, reference=reference, num_samples=N,
                 repeats=R, evaluation_seeds=seeds, batch_size=args.batch_size, device=describe_device(args.device),
                 classifier_hash=weights_hash(clf_dir) if os.path.isdir(clf_dir) else None,
                 reference_hash=hashlib.sha256(to_uint8(x_ref).numpy().tobytes()).hexdigest()[:16],
                 real_images=len(real_train),  # the data itself: another source under the same names is not reused
                 prompts=prompts)  # a text-to-image teacher's rows are made for these prompts
    reused = {} if args.rescore else reusable_rows(os.path.join(out, "report.json"), setup)
    asked = {spec.name for spec in rows_to_run if is_teacher_ddim(spec.name)}  # the grid's teacher rows
    if asked:  # and every teacher row scored before on this setup (past the grid too): a rerun keeps the best row
        rows_to_run += [teacher_row(teacher, r["guidance"], r["steps"], guidable) for name, r in reused.items()
                        if is_teacher_ddim(name) and name not in asked]
    # the `real` row's images: a random draw (datasets may be sorted by class), distinct per repeat
    real_draw = torch.randperm(len(real_train), generator=torch.Generator().manual_seed(seeds[0]))
    if N * R > len(real_draw):
        raise UserError(f"--num-samples {N} x --repeats {R} needs more real training images than the {len(real_draw)} "
                        f"here (the `real` row uses distinct ones): lower --num-samples or --repeats")

    # --- every row on the same seeds and labels
    rows, grid = [], {}  # grid: each row's first images (one per class), by row name

    def measure(spec):
        """Score one row (or take it from the previous report) and keep its first images for grid.png."""
        per_repeat, seconds = [], []
        den = teacher_den if spec.source == teacher else None  # the teacher rows share the model loaded above
        if spec.source is not None and den is None:
            den, _ = open_teacher(spec.source, args.dataset, 1.0, args.device, prompts)

        def images_of(indices):  # (images, labels or None, seconds per batch) of sample indices
            if den is None:  # real training images
                return torch.stack([real_train[int(real_draw[i])][0] for i in indices]), None, []
            return generate(den, functools.partial(spec.sampler, den), indices, seeds[0], args.batch_size, args.device,
                            desc=spec.name, draws=spec.draws)
        if spec.name in reused and reused[spec.name].get("guidance") == spec.guidance:  # the previous report's, on the
            # same setup and guidance: only its grid row is redrawn
            rows.append(reused[spec.name])
            grid[spec.name] = images_of(range(grid_columns(num_classes)))[0]
            return
        for r in range(R):
            images, labels, sec = images_of(range(r * N, (r + 1) * N))
            seconds += sec[1:] or sec
            m = scores(extract(fe, layer, images, rgb, args.device), ref)
            m["class_accuracy"] = (class_accuracy(clf, images, labels, label_classes) if labels is not None and clf is not None
                                   else None)
            m["hf_share"] = high_frequency_share(images.clamp(-1, 1))
            per_repeat.append(m)
            if r == 0:
                grid[spec.name] = images[:grid_columns(num_classes)]
        ms = 1000 * statistics.median(seconds) / args.batch_size if seconds else None
        row = dict(model=spec.name, nfe=spec.nfe, ms_per_image=ms, kid_std=float(np.mean([m["kid_std"] for m in per_repeat])))
        row.update({k: getattr(spec, k) for k in ("guidance", "steps") if getattr(spec, k) is not None})
        for k in METRICS:
            values = [m[k] for m in per_repeat if m[k] is not None]
            row[k] = float(np.mean(values)) if values else None
            if R > 1 and values:
                row[k + "_std"] = float(np.std(values, ddof=1))
        rows.append(row)
        print(f"{spec.name}: " + ", ".join(f"{k} {row[k]:.4g}" for k in METRICS if row[k] is not None), file=sys.stderr)

    for spec in rows_to_run:
        measure(spec)
    yardstick = None
    if asked:  # the teacher's best row must be a minimum of the grid
        yardstick = extend_grid(rows, lambda g, n: measure(teacher_row(teacher, g, n, guidable)), teacher_den.T,
                                guidable, args.extend_rows, asked)
    rows.sort(key=row_order)

    report = dict(dataset=args.dataset, feature_extractor=label, num_samples=N, repeats=R, reference=reference,
                  device=describe_device(args.device), guidance=s, teacher_guidance=guidances, seeds=dict(evaluation=seeds, pairs=pair_seeds(pairs)),
                  classifier_test_accuracy=clf.config.get("test_accuracy") if clf is not None else None, rows=rows,
                  setup=setup, reused_rows=[r["model"] for r in rows if r is reused.get(r["model"])], yardstick=yardstick)
    add_gap_closed(report)
    md = markdown(report)
    columns = prompts or class_names_of(args.dataset, real_train, num_classes)  # what each grid column was made for
    write_report(out, report, md, [grid[r["model"]] for r in rows], columns[:grid_columns(num_classes)])
    pipeline = os.path.join(args.run_dir, DMD, PIPELINE)
    summary = os.path.join(args.run_dir, DMD, "summary.json")  # absent while a resumed run has not finished
    if os.path.isdir(pipeline) and distilled and os.path.exists(summary):  # the exported student's card gets the numbers
        write_model_card(pipeline, dict(distilled, steps_done=load_json(summary)["steps_done"]), report)
    print(md)
    print(f"eval: {out}/report.json, report.md, grid.png, fid_vs_nfe.png (rows: {', '.join(r['model'] for r in rows)})")


def reusable_rows(path, setup):
    """The rows of the report at `path` that no student changes (real, teacher, one-step teacher), where that report
    was made with the same `setup` (teacher weights, classifier, reference, seeds, samples): scoring them again would
    give the same numbers. {} otherwise."""
    if not os.path.isfile(path):
        return {}
    previous = load_json(path)
    if previous.get("setup") != setup:
        return {}
    rows = {r["model"]: r for r in previous["rows"] if not r["model"].startswith("student")}
    if rows:
        print(f"evaluate: {len(rows)} rows that depend on no student reused from {path} (same teacher, classifier, "
              f"seeds; --rescore scores them again)", file=sys.stderr)
    return rows


def number_list(kind):
    """An argparse type: comma-separated positive numbers of `kind`, e.g. 2,4,8."""
    return lambda text: [number(kind, 0)(x) for x in text.split(",")]


def teacher_guidance_grid(s, given, guidable):
    """The guidance scales the teacher rows are scored at: `given` (--teacher-guidance), else s and two scales around
    it, 1 + (s-1)/2 and s + (s-1)/2 (s = 3: 2, 3, 4), so the teacher's best scale is found on either side of the one
    the student was distilled at. A teacher without a null class has one: 1 (no guidance)."""
    if not guidable:
        return [1.0]
    grid = given or [1 + (s - 1) / 2, s, s + (s - 1) / 2]
    return sorted(set(grid) | {s})


def teacher_row_name(n, g, guidable):
    """teacher-g<guidance>-ddim-<steps> for a guidable teacher (--rows teacher-g2- = all of guidance 2's rows), else
    teacher-ddim-<steps>."""
    return f"teacher-g{g:g}-ddim-{n}" if guidable else f"teacher-ddim-{n}"


def pair_seeds(pairs):
    return [pairs["seed"], pairs["seed"] + pairs["num_pairs"]] if pairs else None


def held_out_seeds(args, pairs, distilled):
    """[first, last + 1) of the evaluation's noise seeds, checked disjoint from the pairs' and the probe's."""
    first = EVAL_SEED if args.seed is None else args.seed
    ours = [first, first + args.num_samples * args.repeats]
    probe = distilled.get("probe_samples", 0)  # the distillation run's config: its probe's seeds
    for what, (a, b) in (("the pairs' seeds", pair_seeds(pairs) or (0, 0)), ("the training probe's", (PROBE_SEED, PROBE_SEED + probe))):
        if ours[0] < b and a < ours[1]:
            raise UserError(f"--seed {first}: evaluation seeds {ours[0]}..{ours[1] - 1} overlap {what} {a}..{b - 1}, "
                            f"so the numbers would be measured on training inputs: leave --seed out (default {EVAL_SEED}) "
                            f"or pass one outside {a}..{b - 1}")
    return ours


class Row(NamedTuple):
    """One row of the report: what makes its images, and how."""
    name: str
    source: Optional[str]  # the model's folder or hub id; None = real training images
    sampler: Optional[Callable]  # sampler(den, noise, y, generator) -> images in [-1, 1]; None for real images
    nfe: Optional[int]  # network evaluations per image
    draws: int = 1  # noise draws per sample: z, then the K-step generator's re-noising
    guidance: Optional[float] = None  # a teacher row's guidance scale
    steps: Optional[int] = None  # a DDIM teacher row's step count


# The samplers, as sampler(den, noise, y, generator); a row binds its settings with functools.partial.
def ddim_sampler(den, z, y, generator, steps, s):
    return sample_teacher(den, z, y, steps, s)


def ddpm_sampler(den, z, y, generator, s):
    return sample_teacher(den, z, y, s=s, ddpm=True, generator=generator)


def one_step_sampler(den, z, y, generator, s=1.0):
    return one_step(den, z, y, s)


def generator_sampler(den, noise, y, generator, timesteps):
    return sample_generator(den, noise, y, timesteps)


def teacher_row(teacher, g, n, guidable):
    """The teacher by DDIM at n steps and guidance g (a guided step evaluates the network twice)."""
    return Row(teacher_row_name(n, g, guidable), teacher, functools.partial(ddim_sampler, steps=n, s=g),
               n * (2 if g != 1.0 and guidable else 1), guidance=g, steps=n)


def all_rows(args, teacher, pairs, s, guidances, teacher_den):
    """Every row this run can have: the teacher at each of `guidances` and each step count of --ddim-steps (and the
    pairs' steps at the pairs' guidance). A student runs at the timesteps saved with it (its K steps: NFE = K)."""
    guidable, T = teacher_den.null_label is not None, teacher_den.T
    rows = [Row("real", None, None, None)]
    for g in guidances:
        steps = args.ddim_steps + ([pairs["sampling_steps"]] if pairs and g == pairs["guidance"] else [])
        rows += [teacher_row(teacher, g, n, guidable) for n in sorted(set(steps))]
    if args.full_ddpm and teacher_den.schedule.kind != "ddpm":
        raise UserError("--full-ddpm is the DDPM family's ancestral sampler; a flow-matching teacher's multi-step "
                        "sampler is its Euler ODE (the DDIM-N rows): drop --full-ddpm")
    if args.full_ddpm:
        rows.append(Row(f"teacher-ddpm-{T}", teacher, functools.partial(ddpm_sampler, s=s), T * (1 + (s != 1.0 and guidable)),
                        guidance=s))
    guided = s != 1.0 and guidable
    rows.append(Row("onestep-before", teacher, one_step_sampler, 1))
    if guided:
        rows.append(Row("onestep-before-guided", teacher, functools.partial(one_step_sampler, s=s), 2, guidance=s))
    for name in (STUDENT, STUDENT_EMA, STUDENT_BEST):
        folder = os.path.join(args.run_dir, DMD, name)
        if os.path.isdir(folder):
            ts = student_timesteps(folder, T)
            rows.append(Row(name.replace("_", "-"), folder, functools.partial(generator_sampler, timesteps=ts), len(ts),
                            draws=len(ts)))
    return rows


def grid_neighbours(rows, T, guidable):
    """The teacher's best DDIM row (lowest FID) and what it must be compared with to be a minimum of the grid of step
    counts x guidance: the next step count up and down at its guidance, the next guidance up and down at its step
    count. Where the rows scored so far end, the neighbour lies past that edge: twice the steps (at most T, every
    step of the teacher's schedule), half of them (at least 1), guidance one spacing of the grid further (at least 1,
    no guidance). Returns (best row, [(guidance, steps) not scored yet], [the edges no neighbour lies past, in words])."""
    teacher = [r for r in rows if is_teacher_ddim(r["model"])]
    best = min(teacher, key=lambda r: r["fid"])
    g, n = best.get("guidance", 1.0), best["steps"]
    have = {(r.get("guidance", 1.0), r["steps"]) for r in teacher}
    steps = sorted(m for h, m in have if h == g)
    wanted, edges = [], []
    more, fewer = [m for m in steps if m > n], [m for m in steps if m < n]
    if more or n < T:
        wanted.append((g, more[0] if more else min(2 * n, T)))
    else:
        edges.append(f"DDIM-{n} takes every one of the teacher's {T} steps")
    if fewer or n > 1:
        wanted.append((g, fewer[-1] if fewer else n // 2))
    else:
        edges.append("DDIM-1 is the fewest steps")
    if guidable:
        scales = sorted({h for h, _ in have})
        i = scales.index(g)
        spacing_up = scales[i] - scales[i - 1] if i > 0 else 1.0
        spacing_down = scales[i + 1] - scales[i] if i + 1 < len(scales) else 1.0
        wanted.append((scales[i + 1] if i + 1 < len(scales) else round(g + spacing_up, 4), n))
        if i > 0 or g > 1:
            wanted.append((scales[i - 1] if i > 0 else max(1.0, round(g - spacing_down, 4)), n))
        else:
            edges.append(f"guidance {g:g} is no guidance")
    return best, [w for w in wanted if w not in have], edges


def extend_grid(rows, score, T, guidable, budget, grid):
    """Score teacher rows past the grid's edges (`score(guidance, steps)` appends the row to `rows`) until the best row
    has a worse neighbour on every side, or `budget` rows have been scored by this call (--extend-rows). `grid`: the
    names of the teacher rows asked for. Returns what the report says of it: how many rows were tried, which lie past
    the grid (scored now or reused), the best, whether it is an interior minimum, and why not where not."""
    scored = 0
    while True:
        best, missing, edges = grid_neighbours(rows, T, guidable)
        if not missing or scored >= budget:
            break
        for g, n in missing[:budget - scored]:
            score(g, n)
            scored += 1
    if missing:
        edges.append(f"the budget of --extend-rows {budget} rows past the grid was spent before "
                     f"{', '.join(teacher_row_name(n, g, guidable) for g, n in missing)} could be scored")
    teacher = [r["model"] for r in rows if is_teacher_ddim(r["model"])]
    return dict(best=best["model"], rows_tried=len(teacher), grid_rows=len(grid), added=[m for m in teacher if m not in grid],
                interior=not missing and not edges, edges=edges)


def row_order(row):
    """The report's order: real, the teacher's DDIM rows by guidance and steps, then every other row as it came."""
    if row["model"] == "real":
        return (0,)
    if is_teacher_ddim(row["model"]):
        return (1, row.get("guidance", 1.0), row["steps"])
    return (2,)


def select_rows(rows, wanted):
    """The rows whose names start with one of the prefixes `wanted` (--rows; None = all). A prefix that matches no
    row is refused, naming the rows there are, before any work is done."""
    if wanted is None:
        return rows
    unknown = [w for w in wanted if not any(row.name.startswith(w) for row in rows)]
    if unknown:
        raise UserError(f"--rows {','.join(unknown)} matches no row of this run: pick among "
                        f"{', '.join(row.name for row in rows)} (or their start: teacher = every teacher row)")
    return [row for row in rows if row.name.startswith(wanted)]


def write_report(out, report, md, grid, class_names):
    """report.json, report.md, grid.png and fid_vs_nfe.png, all made in a staging folder beside `out` and only then
    renamed into it: a failure while making any of them leaves the previous report whole. `grid`: each row's first
    images, in the report's row order."""
    stage = out.rstrip("/") + ".tmp"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    try:
        write_json(report, os.path.join(stage, "report.json"))
        with open(os.path.join(stage, "report.md"), "w") as f:
            f.write(md)
        plot_grid(report, grid, class_names, os.path.join(stage, "grid.png"))
        plot_fid_vs_nfe(report, os.path.join(stage, "fid_vs_nfe.png"))
        os.makedirs(out, exist_ok=True)
        for name in sorted(os.listdir(stage)):
            os.replace(os.path.join(stage, name), os.path.join(out, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def class_names_of(dataset, real_train, num_classes):
    """The grid's column titles where its columns are the classes (data.class_names_of_data); none for an
    unconditional teacher (its columns are seeds)."""
    if not 0 < num_classes == grid_columns(num_classes):
        return []
    return class_names_of_data(dataset, real_train)


def add_gap_closed(report):
    """For each student: the share of the teacher -> real FID gap it closes, (FID_teacher - FID) / (FID_teacher -
    FID_real), against the teacher's BEST DDIM row over step counts x guidance scales (`gap_reference`): a student is
    read against the best the teacher can do, not against one chosen sampler or the guidance it was distilled at.
    Also, labelled as such, against the teacher's best row at the student's own guidance (`gap_reference_own`,
    `gap_closed_own`): what earlier reports called "gap closed", which flatters a student whose guidance is not the
    teacher's best."""
    by_name = {r["model"]: r for r in report["rows"]}
    teachers = [r for r in report["rows"] if is_teacher_ddim(r["model"])]
    own = [r for r in teachers if r.get("guidance", report.get("guidance")) == report.get("guidance")]
    report["gap_reference"] = report["gap_reference_own"] = None
    if not teachers or "real" not in by_name:  # --rows left them out
        return
    for key, candidates in (("", teachers), ("_own", own)):
        if not candidates:
            continue
        teacher = min(candidates, key=lambda r: r["fid"])
        gap = teacher["fid"] - by_name["real"]["fid"]
        report["gap_reference" + key] = teacher["model"]
        for r in report["rows"]:
            if r["model"].startswith("student"):
                r["gap_closed" + key] = (teacher["fid"] - r["fid"]) / gap if gap > 0 else None


def describe_device(device):
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def markdown(report):
    def cell(r, k, fmt):
        if r.get(k) is None:
            return "-"
        return fmt.format(r[k]) + (" ± " + fmt.format(r[k + "_std"]) if k + "_std" in r and k != "kid" else "")
    seeds = report["seeds"]
    lines = [f"Dataset **{report['dataset']}**, {report['num_samples']} samples per row and repeat, {report['repeats']} "
             f"repeat(s) (mean ± std), reference: {report['reference']}.",
             f"Features: {report['feature_extractor']}. Device: {report['device']}.",
             f"Noise seeds {seeds['evaluation'][0]}..{seeds['evaluation'][1] - 1} (held out; the pairs used "
             f"{'..'.join(str(x) for x in seeds['pairs']) if seeds['pairs'] else 'none'}). "
             f"Guidance: the student's (distillation's) {report['guidance']}; the teacher rows' "
             f"{', '.join(f'{g:g}' for g in report.get('teacher_guidance', [report['guidance']]))}.",
             f"Gap closed = (FID_teacher - FID) / (FID_teacher - FID_real) against the teacher's best row over steps x "
             f"guidance, {report['gap_reference']}; \"at own guidance\": against its best row at the student's guidance, "
             f"{report.get('gap_reference_own')}."]
    y = report.get("yardstick")
    if y:
        past = f" + {len(y['added'])} past its edges ({', '.join(y['added'])})" if y["added"] else ""
        verdict = ("an interior minimum: its neighbours in steps and in guidance were all scored, and all are worse"
                   if y["interior"] else f"not known to be a minimum: {'; '.join(y['edges'])}")
        lines.append(f"Teacher yardstick: {y['rows_tried']} DDIM rows tried ({y['grid_rows']} of the grid{past}); "
                     f"the best, {y['best']}, is {verdict}.")
    if report["classifier_test_accuracy"] is not None:
        lines.append(f"Feature classifier held-out accuracy: {report['classifier_test_accuracy']:.1%}.")
    lines += ["", "| model | NFE | FID | KID | precision | recall | class accuracy | high-freq. share | gap closed | "
                  "at own guidance | ms / image |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        kid = f"{r['kid']:.4g} ± {r['kid_std']:.2g}"
        cells = [r["model"], r["nfe"] or "-", cell(r, "fid", "{:.2f}"), kid, cell(r, "precision", "{:.3f}"),
                 cell(r, "recall", "{:.3f}"), cell(r, "class_accuracy", "{:.1%}"), cell(r, "hf_share", "{:.3f}"), cell(r, "gap_closed", "{:.0%}"),
                 cell(r, "gap_closed_own", "{:.0%}"), cell(r, "ms_per_image", "{:.2f}")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def plot_fid_vs_nfe(report, path):
    """FID against NFE (log scale): the teacher's DDIM curve at each guidance, each one-step model as a point, the
    real floor. The students and the teacher's best row carry their FID; the legend sits outside the axes, so that it
    hides no point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for g in sorted({r.get("guidance") for r in rows if is_teacher_ddim(r["model"])}, key=lambda g: g or 0):
        curve = sorted((r for r in rows if is_teacher_ddim(r["model"]) and r.get("guidance") == g), key=lambda r: r["nfe"])
        own = " (the student's)" if g == report["guidance"] else ""
        ax.errorbar([r["nfe"] for r in curve], [r["fid"] for r in curve], yerr=[r.get("fid_std", 0) for r in curve],
                    marker="o", markersize=4, label=f"teacher, DDIM, guidance {g:g}{own}" if g is not None else "teacher, DDIM")
    students = [r for r in rows if r["model"].startswith("student")]
    for r in rows:
        if r["model"].startswith(("student", "onestep", "teacher-ddpm")):
            student = r in students
            ax.errorbar([r["nfe"]], [r["fid"]], yerr=[r.get("fid_std", 0)], marker="*" if student else "s",
                        linestyle="none", markersize=12 if student else 7, label=r["model"], zorder=3)
            if student:  # one label each, stacked, so that students at the same NFE do not print over each other
                i = students.index(r)
                ax.annotate(f"{r['model']}: {r['fid']:.1f}", (r["nfe"], r["fid"]), textcoords="offset points",
                            xytext=(14, 16 * (len(students) - 1) / 2 - 16 * i), va="center", fontsize=8,
                            arrowprops=dict(arrowstyle="-", color="grey", lw=0.5))
        if r["model"] == report.get("gap_reference"):
            ax.annotate(f"best teacher row\n{r['fid']:.1f}", (r["nfe"], r["fid"]), xytext=(0, -22),
                        textcoords="offset points", ha="center", fontsize=7,
                        arrowprops=dict(arrowstyle="-", color="grey", lw=0.5))
        if r["model"] == "real":
            ax.axhline(r["fid"], color="grey", linestyle="--", label="real training images (floor)")
    if any(r["nfe"] for r in rows):  # `--rows real` alone puts nothing on the NFE axis, which log scale refuses
        ax.set_xscale("log")
        ax.set_xlim(0.7, 1.6 * max(r["nfe"] for r in rows if r["nfe"]))  # room for the points at NFE 1 and their labels
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel("FID")
    ax.set_title(f"{report['dataset']}: FID vs NFE ({report['feature_extractor'].split(' (')[0]})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_grid(report, grid, class_names, path):
    """grid.png: one row of images per report row (the same seeds and labels in every row), each labelled in the left
    margin with its model name and FID, the columns with their class names where the columns are the classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid
    cols, (c, h, w) = len(grid[0]), grid[0].shape[1:]
    inch = 0.5 * max(h, w) / 28  # 28-pixel images at 0.5 inch each: 2x their size at the saved dpi
    fig, axes = plt.subplots(len(grid), 1, figsize=(2.6 + cols * inch, 0.35 + len(grid) * inch * 1.05), squeeze=False)
    for ax, row, images in zip(axes[:, 0], report["rows"], grid):
        strip = make_grid(images.float().clamp(-1, 1).add(1).div(2), nrow=cols, padding=1, pad_value=1.0)
        ax.imshow(strip.permute(1, 2, 0).numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        name = "real (any class)" if row["model"] == "real" else row["model"]  # real images are drawn at random
        ax.set_ylabel(f"{name}\nFID {row['fid']:.1f}", rotation=0, ha="right", va="center", fontsize=7)
    for j, name in enumerate(class_names[:cols]):
        axes[0, 0].text((j + 0.5) * (w + 1), -2, name, ha="center", va="bottom", fontsize=6, rotation=30)
    fig.subplots_adjust(left=2.4 / fig.get_figwidth(), right=0.99, top=1 - 0.35 / fig.get_figheight(), bottom=0.01,
                        hspace=0.05)
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=112)
    plt.close(fig)


if __name__ == "__main__":
    keep_freed_memory()  # CPU speed (cli.keep_freed_memory)
    run(main)
