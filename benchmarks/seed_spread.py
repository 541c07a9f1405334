"""Seed-to-seed spread of the method: the DMD stage run with several distillation seeds on one teacher (and its pairs),
each student evaluated on the same held-out seeds, summarised as mean ± std.

    python benchmarks/seed_spread.py --run-dir runs/mnist --seeds 0 1 2 -- <distill.py flags>
    python benchmarks/seed_spread.py --run-dir runs/mnist --yardstick runs/mnist/eval/report.json --name gt07 -- ...

Each seed runs in <run-dir>/<name>/seed<k>/ (the teacher, pairs and classifier linked from --run-dir), so the demo's
own dmd/ is left alone; finished seeds are not rerun, so two invocations with different --seeds can share the two
cores and a third tabulates them all. Writes <run-dir>/<name>/spread.md and spread.json. The students are read against
the teacher's best row over steps x guidance: by default each seed's evaluation scores the teacher too; with
--yardstick (a report.json of `evaluate.py --fid --rows real,teacher --teacher-guidance ...` on the same teacher,
classifier and held-out seeds) only the students and the real row are scored, and the teacher rows come from there.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("fid", "ratio", "gap_closed", "kid", "precision", "recall", "class_accuracy", "hf_share")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/mnist", help="a finished run: teacher/, classifier/ (and pairs/ if the recipe uses them)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="distill.py --seed values")
    p.add_argument("--eval-flags", default="--num-samples 1000", help="evaluate.py flags (quoted)")
    p.add_argument("--yardstick", default=None, help="report.json holding the teacher rows (see above)")
    p.add_argument("--name", default="spread", help="sub-folder of --run-dir for these runs")
    p.add_argument("distill_flags", nargs=argparse.REMAINDER, help="after --: distill.py flags, e.g. the Makefile's DISTILL_FLAGS")
    args = p.parse_args()
    flags = [f for f in args.distill_flags if f != "--"]
    spread = os.path.join(args.run_dir, args.name)
    yardstick = read_json(args.yardstick) if args.yardstick else None
    rows_flag = ["--rows", "real,student"] if yardstick else ["--ddim-steps", "25"]
    rows = []
    for seed in args.seeds:
        d = os.path.join(spread, f"seed{seed}")
        os.makedirs(d, exist_ok=True)
        for sub in ("teacher", "pairs", "classifier"):  # pairs only where the run has them (DMD2 needs none)
            link = os.path.join(d, sub)
            if os.path.exists(os.path.join(args.run_dir, sub)) and not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(args.run_dir, sub)), link)
        if not os.path.exists(os.path.join(d, "dmd", "summary.json")):
            resume = ["--resume"] if os.path.exists(os.path.join(d, "dmd", "train_state.pt")) else ["--overwrite"]
            subprocess.run([sys.executable, os.path.join(ROOT, "distill.py"), "--run-dir", d, "--seed", str(seed), *flags,
                            *resume], check=True)
        if not os.path.exists(os.path.join(d, "eval", "report.json")):
            subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--fid", "--run-dir", d, *rows_flag,
                            *args.eval_flags.split()], check=True)
        report = read_json(os.path.join(d, "eval", "report.json"))
        by = {r["model"]: r for r in report["rows"]}
        if yardstick:  # the teacher rows of the yardstick, its real row checked against this evaluation's
            teachers = [r for r in yardstick["rows"] if r["model"].startswith("teacher-")]
            real = next(r for r in yardstick["rows"] if r["model"] == "real")
            if abs(real["fid"] - by["real"]["fid"]) > 1e-3 * real["fid"]:
                sys.exit(f"error: the real row scores {by['real']['fid']:.3f} here and {real['fid']:.3f} in "
                         f"{args.yardstick}: another classifier, reference or seeds; remake the yardstick")
            teacher = min(teachers, key=lambda r: r["fid"])
            for name in ("student", "student-ema", "student-best"):
                if name in by:
                    by[name]["gap_closed"] = (teacher["fid"] - by[name]["fid"]) / (teacher["fid"] - by["real"]["fid"])
        else:
            teacher = by[report["gap_reference"]]
        for name in ("student", "student-ema", "student-best"):
            if name in by:
                r = by[name]
                rows.append(dict(seed=seed, model=name, ratio=r["fid"] / teacher["fid"], **{k: r.get(k) for k in METRICS if k != "ratio"}))
        rows.append(dict(seed=seed, model=teacher["model"], ratio=1.0, **{k: teacher.get(k) for k in METRICS if k != "ratio"}))
        rows.append(dict(seed=seed, model="real", ratio=by["real"]["fid"] / teacher["fid"], **{k: by["real"].get(k) for k in METRICS if k != "ratio"}))
    lines = [f"{len(args.seeds)} distillation seeds ({', '.join(map(str, args.seeds))}) on the teacher and pairs of {args.run_dir}; "
             f"distill.py {' '.join(flags)}; evaluation: {report['num_samples']} samples on held-out seeds, "
             f"{report['feature_extractor']}, device {report['device']}. Mean ± std over the seeds.", "",
             "| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for k in METRICS:
            v = [r[k] for r in rows if r["model"] == name and r[k] is not None]
            cells.append("-" if not v else f"{statistics.mean(v):.4g} ± {statistics.stdev(v) if len(v) > 1 else 0:.2g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(spread, "spread.md"), "w") as f:
        f.write(table)
    with open(os.path.join(spread, "spread.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(table)


def read_json(path):
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
