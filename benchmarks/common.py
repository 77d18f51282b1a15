"""Shared by the benchmark scripts: where and on what a figure was measured."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:  # the installed engine; in a bare checkout (a copy of the tree on a GPU machine), the source tree
    import ijepa_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))
from ijepa_fast.bench.suite import commit as _commit  # noqa: E402
from ijepa_fast.bench.suite import cpu_name  # noqa: E402,F401  (one definition, shared with ijepa-fast bench)


def commit() -> str:
    """The checkout's commit (+dirty); IJEPA_FAST_COMMIT names it where the copy has no .git."""
    return _commit(ROOT)


def environment(device: str = "cpu") -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "commit": commit(),
           "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
           "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            import triton
            env["triton"] = triton.__version__
        except ImportError:
            pass
    return env


def emit(record: dict, out=None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def time_host(fn, repeats: int = 50, warmup: int = 5) -> list[float]:
    """Wall-clock milliseconds of fn() on the host, one sample per call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def summary(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"median_ms": round(statistics.median(ms), 3), "p10_ms": round(ms[len(ms) // 10], 3),
            "p90_ms": round(ms[(len(ms) * 9) // 10], 3), "runs": len(ms)}


def write_markdown(path, title: str, command: str, rows: list[dict], columns: list[tuple[str, str]],
                   notes: str = "") -> None:
    """A results table with the machine, versions, commit and date the figures came from."""
    e = rows[0]
    where = e.get("gpu") or f"{e['cpu']} ({e['cpus']} cores available)"
    versions = ", ".join(f"{k} {e[k]}" for k in ("torch", "cuda", "triton", "python") if k in e)
    lines = [f"# {title}", "", f"Measured on {where}; {versions}; commit {e['commit']}; {e['date']}.",
             f"Command: `{command}`", "", "| " + " | ".join(h for _, h in columns) + " |",
             "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in columns) + " |")
    if notes:
        lines += ["", notes]
    Path(path).write_text("\n".join(lines) + "\n")
