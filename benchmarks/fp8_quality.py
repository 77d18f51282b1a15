"""Quality gate for FP8: the digits benchmark's ``stable`` recipe with bf16 weights, then with FP8
encoder linear layers added, on the same split; the gate passes when the FP8 run's linear probe on
the target encoder is within ``--tolerance`` points of the bf16 run's and above the random encoder's.

    python benchmarks/fp8_quality.py [--recipe stable] [--splits 0] [--device cuda] [--fp8 rowwise]
                                     [--tolerance 2.0] [--out F.jsonl] [--md F.md]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from common import ROOT, emit, environment


def gate(bf16: dict, fp8: dict, tolerance: float) -> tuple[bool, str]:
    """(passed, why) from the two runs' mean linear-probe accuracies (%)."""
    drop = bf16["probe_target"] - fp8["probe_target"]
    ok = drop <= tolerance and fp8["probe_target"] > fp8["probe_random"]
    return ok, (f"target-encoder linear probe {fp8['probe_target']:.2f} % with FP8 against "
                f"{bf16['probe_target']:.2f} % in bf16 (drop {drop:.2f} points, allowed {tolerance}); "
                f"random encoder {fp8['probe_random']:.2f} %")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="stable")
    p.add_argument("--splits", default="0")
    p.add_argument("--device", default="cuda")
    p.add_argument("--fp8", default="rowwise", choices=("rowwise", "tensorwise"))
    p.add_argument("--tolerance", type=float, default=2.0, help="allowed drop of the linear probe, in points")
    p.add_argument("--workdir", default=tempfile.gettempdir() + "/fp8_quality")
    p.add_argument("--out")
    p.add_argument("--md")
    args = p.parse_args()
    means = {}
    for name, extra in (("bf16", []), (f"fp8 {args.fp8}", ["--set", f"perf.fp8={args.fp8}"])):
        tag = name.replace(" ", "_")
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--recipes", args.recipe, "--splits",
               args.splits, "--device", args.device, "--probe", "target,random", "--workdir",
               f"{args.workdir}/{tag}", "--set", "perf.bf16_weights=true", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{") and '"split"' in x]
        if proc.returncode or not rows:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the {name} run failed")
        means[name] = {k: sum(r[k] for r in rows) / len(rows) for k in ("probe_target", "probe_random")}
        emit({"bench": "fp8_quality", "run": name, "recipe": args.recipe, "splits": args.splits, **means[name],
              **environment(args.device)}, args.out)
    ok, why = gate(means["bf16"], means[f"fp8 {args.fp8}"], args.tolerance)
    emit({"bench": "fp8_quality_gate", "passed": ok, "why": why}, args.out)
    if args.md:
        env = environment(args.device)
        open(args.md, "w").write(
            f"# FP8 quality gate on the digits benchmark\n\nMeasured on {env.get('gpu') or env['cpu']}; torch "
            f"{env['torch']}; commit {env['commit']}; {env['date']}.\nRecipe `{args.recipe}`, splits {args.splits}, "
            f"bf16 weights, then FP8 {args.fp8} on top.\n\n**{'passed' if ok else 'failed'}**: {why}\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
