import pytest
from conftest import read_json, run, tiny_teacher

from checkpoints import weights_hash
from files import write_json


def test_seed_spread_reads_each_seed_against_the_teachers_best_row(tmp_path):
    """benchmarks/seed_spread.py tabulates finished seeds (nothing rerun) against the best DDIM row of this teacher's
    yardstick: gap closed = (best - FID) / (best - real). A yardstick of another teacher is refused (exit 2)."""
    d = tmp_path / "run"
    tiny_teacher(d / "teacher", "mnist", "v_prediction")
    real = dict(model="real", fid=10.0)
    rows = [real, dict(model="teacher-g2-ddim-4", fid=50.0, guidance=2.0, steps=4),
            dict(model="teacher-g3-ddim-2", fid=60.0, guidance=3.0, steps=2), dict(model="onestep-before", fid=5.0)]
    yardstick = dict(setup=dict(teacher_hash="0" * 16), rows=rows, num_samples=8, feature_extractor="classifier")
    for folder in ("eval", "spread/seed0/dmd", "spread/seed0/eval"):
        (d / folder).mkdir(parents=True)
    write_json(yardstick, d / "eval" / "report.json")
    seed = d / "spread" / "seed0"
    write_json({}, seed / "dmd" / "summary.json")  # finished: not rerun
    write_json(dict(rows=[real, dict(model="student", fid=40.0)]), seed / "eval" / "report.json")
    other = run("benchmarks/seed_spread.py", "--run-dir", d, "--seeds", 0, "--", "--guidance", "best", fresh=True,
                check=False, limit=120)
    assert other.returncode == 2 and "no yardstick of this teacher" in other.stderr
    yardstick["setup"]["teacher_hash"] = weights_hash(str(d / "teacher"))
    write_json(yardstick, d / "eval" / "report.json")
    run("benchmarks/seed_spread.py", "--run-dir", d, "--seeds", 0, "--", "--guidance", "best", fresh=True, limit=120)
    by = {r["model"]: r for r in read_json(d / "spread" / "spread.json")}
    assert by["student"]["gap_closed"] == pytest.approx((50 - 40) / (50 - 10))
    assert by["student"]["ratio"] == pytest.approx(40 / 50) and set(by) == {"student", "teacher-g2-ddim-4", "real"}
