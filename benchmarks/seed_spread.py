"""Seed-to-seed spread of the method: the distillation run with several seeds on one teacher (and its pairs), each
student evaluated on the same held-out seeds, summarised as mean ± std.

    python benchmarks/seed_spread.py --run-dir runs/mnist --seeds 0 1 2 -- <distill.py flags>
    python benchmarks/seed_spread.py --run-dir runs/mnist --kd-flags "<the Makefile's KD_FLAGS>" -- <its DISTILL_FLAGS
        without --generator-init>        # the demo's recipe: each seed's own warm start, then DMD2 from it

Each seed runs in <run-dir>/<name>/seed<k>/ (the teacher, pairs and classifier linked from --run-dir), so the demo's
own runs are left alone; finished seeds are not rerun, so two invocations with different --seeds can share the two
cores and a third tabulates them all. With --kd-flags each seed first runs the regression warm start (kd/, same seed)
and DMD2 starts from it. The students are read against the teacher's best row over steps x guidance of the
yardstick, <run-dir>/eval/report.json (`evaluate.py --fid --rows real,teacher,onestep` on the same teacher,
classifier and held-out seeds), which also resolves `--guidance best`; each seed's evaluation scores its students and
the real row, checked against the yardstick's. Writes <run-dir>/<name>/spread.md and spread.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's modules
from checkpoints import weights_hash  # noqa: E402
from metrics import best_teacher_row  # noqa: E402

METRICS = ("fid", "ratio", "gap_closed", "kid", "precision", "recall", "class_accuracy", "hf_share")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/mnist", help="a run with teacher/, classifier/, eval/report.json (and pairs/)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distill.py --seed values")
    p.add_argument("--eval-flags", default="--num-samples 1000", help="evaluate.py flags (quoted)")
    p.add_argument("--kd-flags", default=None, help="distill.py flags of the regression warm start (quoted; --out kd)")
    p.add_argument("--name", default="spread", help="sub-folder of --run-dir for these runs")
    p.add_argument("distill_flags", nargs=argparse.REMAINDER, help="after --: distill.py flags, e.g. the Makefile's DISTILL_FLAGS")
    args = p.parse_args()
    flags = [f for f in args.distill_flags if f != "--"]
    teacher_dir = os.path.join(args.run_dir, "teacher")
    teacher = best_teacher_row(args.run_dir, weights_hash(teacher_dir)) if os.path.isdir(teacher_dir) else None
    if teacher is None:
        print(f"error: no yardstick of this teacher in {args.run_dir}/eval/report.json: run `python evaluate.py --fid "
              f"--rows real,teacher,onestep --run-dir {args.run_dir}` first (the students are read against it)",
              file=sys.stderr)
        sys.exit(2)
    yardstick = read_json(os.path.join(args.run_dir, "eval", "report.json"))
    real = next(r for r in yardstick["rows"] if r["model"] == "real")
    flags = [str(teacher["guidance"]) if f == "best" and i and flags[i - 1] == "--guidance" else f
             for i, f in enumerate(flags)]  # --guidance best: the yardstick's, resolved once for every seed
    spread = os.path.join(args.run_dir, args.name)
    rows = []
    for seed in args.seeds:
        d = os.path.join(spread, f"seed{seed}")
        os.makedirs(d, exist_ok=True)
        for sub in ("teacher", "pairs", "classifier"):  # pairs only where the run has them (DMD2 needs none)
            link = os.path.join(d, sub)
            if os.path.exists(os.path.join(args.run_dir, sub)) and not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(args.run_dir, sub)), link)
        init = []
        if args.kd_flags:
            distill(d, seed, "kd", args.kd_flags.split())
            init = ["--generator-init", os.path.join(d, "kd", "student")]
        distill(d, seed, "dmd", flags + init)
        if not os.path.exists(os.path.join(d, "eval", "report.json")):
            subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--fid", "--run-dir", d, "--rows",
                            "real,student", *args.eval_flags.split()], check=True)
        by = {r["model"]: r for r in read_json(os.path.join(d, "eval", "report.json"))["rows"]}
        if abs(real["fid"] - by["real"]["fid"]) > 1e-3 * real["fid"]:
            print(f"error: the real row scores {by['real']['fid']:.3f} in {d} and {real['fid']:.3f} in the yardstick: "
                  f"another classifier, reference or seeds; remake the yardstick", file=sys.stderr)
            sys.exit(2)
        for name in ("student", "student-ema", "student-best"):
            if name in by:
                r = by[name]
                rows.append(dict({k: r.get(k) for k in METRICS}, seed=seed, model=name, ratio=r["fid"] / teacher["fid"],
                                 gap_closed=(teacher["fid"] - r["fid"]) / (teacher["fid"] - real["fid"])))
        rows.append(dict(seed=seed, model=teacher["model"], ratio=1.0, **{k: teacher.get(k) for k in METRICS if k != "ratio"}))
        rows.append(dict(seed=seed, model="real", ratio=real["fid"] / teacher["fid"], **{k: real.get(k) for k in METRICS if k != "ratio"}))
    lines = [f"{len(args.seeds)} distillation seeds ({', '.join(map(str, args.seeds))}) on the teacher of {args.run_dir}; "
             f"warm start: {args.kd_flags or 'none'}; distill.py {' '.join(flags)}; evaluation: "
             f"{yardstick['num_samples']} samples on held-out seeds, {yardstick['feature_extractor']}, against the "
             f"teacher's best row {teacher['model']}. Mean ± std over the seeds.", "",
             "| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for k in METRICS:
            v = [r[k] for r in rows if r["model"] == name and r.get(k) is not None]
            cells.append("-" if not v else f"{statistics.mean(v):.4g} ± {statistics.stdev(v) if len(v) > 1 else 0:.2g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(spread, "spread.md"), "w") as f:
        f.write(table)
    with open(os.path.join(spread, "spread.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(table)


def distill(d, seed, out, flags):
    """One distill.py run of a seed into d/out, unless finished; resumed where it was interrupted."""
    if os.path.exists(os.path.join(d, out, "summary.json")):
        return
    resume = ["--resume"] if os.path.exists(os.path.join(d, out, "train_state.pt")) else ["--overwrite"]
    subprocess.run([sys.executable, os.path.join(ROOT, "distill.py"), "--run-dir", d, "--seed", str(seed),
                    "--out", out, *flags, *resume], check=True)


def read_json(path):
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
