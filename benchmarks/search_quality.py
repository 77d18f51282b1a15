"""Search recipes for the digits quality benchmark: many variants, several splits, run side by side.

    python benchmarks/search_quality.py [--variants base,b32,...] [--splits 0,1,2] [--parallel 12]
                                        [--device cuda] [--launch-minutes 3] [--out F.jsonl] [--md F.md]

Each (variant, split) is one `bench_quality.py` run of recipe e4 (the benchmark's `stable` recipe
with EMA 0.999 -> 1 and batch 128, the base the search started from) with the variant's
overrides on top, in its own process (one CPU thread each), probing the target and context
encoders; the `base` variant also probes the random encoder, which the table compares against.
Jobs start split by split (every variant on split 0 first), so a search cut short still compares
every variant on the same splits; no job starts after --launch-minutes, and jobs still running at
--stop-minutes are stopped and left out. A GPU runs a dozen of these small pretrainings at once;
the table's winners are then confirmed on the CPU with bench_quality.py itself.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, write_markdown

# e4: `stable` as it was when this search ran (quality_digits_search.md)
E4 = ["mask.mode=default", "optim.ema=[0.999, 1.0]", "data.batch_size=128"]
VARIANTS = {
    "base": [],
    "ep60": ["optim.epochs=60"],
    "b64": ["data.batch_size=64"],
    "b32": ["data.batch_size=32"],
    "b32-lr5e-4": ["data.batch_size=32", "optim.start_lr=1e-4", "optim.lr=5e-4"],
    "b32-ema0.998": ["data.batch_size=32", "optim.ema=[0.998, 1.0]"],
    "b32-ema0.9995": ["data.batch_size=32", "optim.ema=[0.9995, 1.0]"],
    "lr2e-3": ["optim.start_lr=4e-4", "optim.lr=2e-3"],
    "pred192x6": ["model.pred_dim=192", "model.pred_depth=6"],
    "targets-small": ["mask.target_scale=[0.1, 0.15]"],
    "mse": ["optim.loss=mse"],
    "ep60-ema0.9995": ["optim.epochs=60", "optim.ema=[0.9995, 1.0]"],
}


def job(variant, split, args, logdir):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_quality.py"), "--recipes", "stable", "--splits",
           str(split), "--threads", "1", "--device", args.device, "--workdir", str(Path(args.workdir) / variant),
           "--probe", "target,context,random" if variant == "base" else "target,context"]
    for o in E4 + args.set + VARIANTS[variant]:
        cmd += ["--set", o]
    log = open(logdir / f"{variant}-split{split}.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log


def result(logfile: Path):
    for line in reversed(logfile.read_text().splitlines()):
        if line.startswith("{") and '"probe_target"' in line:
            r = json.loads(line)
            if "split" in r and isinstance(r["split"], int):
                return r
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--splits", default="0,1,2")
    p.add_argument("--parallel", type=int, default=12)
    p.add_argument("--device", default="cuda")
    p.add_argument("--set", action="append", default=[], help="extra override for every variant")
    p.add_argument("--launch-minutes", type=float, default=3.0)
    p.add_argument("--stop-minutes", type=float, default=4.0)
    p.add_argument("--workdir", default=str(ROOT / "runs" / "search"))
    p.add_argument("--out")
    p.add_argument("--md")
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    logdir = Path(args.workdir) / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    queue = [(v, int(s)) for s in args.splits.split(",") for v in variants]
    t0, running, rows = time.time(), {}, []
    while queue or running:
        elapsed = (time.time() - t0) / 60
        while queue and len(running) < args.parallel and elapsed < args.launch_minutes:
            key = queue.pop(0)
            running[key] = job(*key, args, logdir)
        for key, (proc, log) in list(running.items()):
            if proc.poll() is None and elapsed < args.stop_minutes:
                continue
            if proc.poll() is None:
                proc.kill()
            log.close()
            del running[key]
            r = result(logdir / f"{key[0]}-split{key[1]}.log")
            status = "killed at the time limit" if proc.returncode and r is None else f"rc {proc.returncode}"
            print(f"[{elapsed:5.1f} min] {key[0]} split {key[1]}: {status}"
                  + (f", target {r['probe_target']:.2f}" if r else ""), flush=True)
            if r:
                r = {k: v for k, v in r.items() if k != "curve"} | {"variant": key[0], "overrides": VARIANTS[key[0]]}
                rows.append(r)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(r) + "\n")
        if not queue and not running:
            break
        if elapsed >= args.launch_minutes:
            queue.clear()
        time.sleep(1)
    table = summarise(rows)
    for s in table:
        print(json.dumps(s))
    if args.md and table:
        cols = [("variant", "variant"), ("overrides", "overrides on e4"), ("splits", "splits"),
                ("target", "linear, target (%)"), ("vs_random", "minus random, same splits"),
                ("context", "linear, context (%)"), ("knn", "kNN, target (%)"), ("std", "target per-dim std"),
                ("steps", "steps")]
        write_markdown(args.md, "Recipe search on the digits benchmark", " ".join(sys.argv), table, cols,
                       "Mean over the splits each variant finished; `minus random` compares with the random "
                       "encoder on the same splits (from the `base` runs).")


def summarise(rows):
    random = {r["split"]: r["probe_random"] for r in rows if "probe_random" in r}
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]
        m = lambda k: statistics.mean(r[k] for r in rs)  # noqa: E731
        diffs = [r["probe_target"] - random[r["split"]] for r in rs if r["split"] in random]
        out.append({"variant": v, "overrides": " ".join(VARIANTS[v]) or "(none)",
                    "splits": ",".join(str(r["split"]) for r in rs), "target": round(m("probe_target"), 2),
                    "vs_random": f"{statistics.mean(diffs):+.2f}" if diffs else "",
                    "context": round(m("probe_context"), 2), "knn": round(m("knn_target"), 2),
                    "std": round(m("target_std"), 4), "steps": rs[0]["steps"], **{k: rs[0][k] for k in (
                        "date", "commit", "torch", "python", "cpu", "cpus", "gpu", "cuda", "triton") if k in rs[0]}})
    return sorted(out, key=lambda s: -s["target"])


if __name__ == "__main__":
    main()
