"""Turn a pytest-benchmark JSON into the README's markdown tables.

    pytest benchmarks --benchmark-only --benchmark-json bench.json && python benchmarks/report.py bench.json
"""
import json
import sys


def main(path):
    with open(path) as f:
        benches = json.load(f)["benchmarks"]
    latency = [b["extra_info"] for b in benches if "speedup_vs_teacher" in b["extra_info"]]
    steps = [b["extra_info"] for b in benches if "step_ms" in b["extra_info"]]
    device = (latency or steps)[0]["device"] if latency or steps else "?"
    print(f"Device: {device}\n")
    print("| dataset | batch | one-step ms/image | teacher ms/image (T steps) | speedup | one-step peak memory MB |")
    print("|---|---|---|---|---|---|")
    for e in latency:
        print(f"| {e['dataset']} | {e['batch']} | {e['ms_per_image']:.3f} | {e['teacher_ms_per_image']:.1f} ({e['teacher_steps']}, "
              f"scaled from {e['teacher_measured_steps']}) | {e['speedup_vs_teacher']:.0f}x | {e['peak_mem_mb']:.0f} ({e['mem_kind']}) |")
    print("\n| dataset | step | batch | DMD step ms | teacher forward ms | step / forward | step peak MB | teacher train step peak MB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for e in steps:
        print(f"| {e['dataset']} | {e.get('recipe', 'dmd')} | {e['batch']} | {e['step_ms']:.0f} | {e['teacher_forward_ms']:.0f} | {e['step_vs_teacher_forward']:.1f}x | "
              f"{e['peak_mem_mb']:.0f} | {e['teacher_train_step_peak_mem_mb']:.0f} | {e['mem_vs_teacher_train_step']:.1f}x |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
