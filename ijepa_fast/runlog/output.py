"""What a run writes as it goes: metric rows (JSONL and CSV), a progress bar, a loss plot."""
from __future__ import annotations

import csv
import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("ijepa_fast")

COLUMNS = ("step", "epoch", "loss", "lr", "wd", "momentum", "grad_norm", "ctx_tokens", "tgt_tokens",
           "step_ms", "images_per_s", "skipped", "mem_gib", "feat_std", "feat_std_min", "feat_rank")


FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")

# when the console last showed something (a log line, the progress bar), and what the run is doing
_console = {"at": time.monotonic(), "bar": None, "bars": 0}


def touch() -> None:
    """Note that the console just showed something (``Heartbeat`` stays quiet for a while)."""
    _console["at"] = time.monotonic()


class _Console(logging.StreamHandler):
    def emit(self, record) -> None:
        super().emit(record)
        touch()


def setup_logging(run_dir: Path | None = None, rank: int = 0, defer: bool = False) -> None:
    """INFO to stderr (rank 0 only) and to <run_dir>/train.log. With ``defer``, the file gets
    nothing until ``open_file_log`` (then everything so far): a set-up that fails leaves no trace
    in the run folder."""
    log.setLevel(logging.INFO)
    log.propagate = False
    close_logging()
    if rank == 0:
        h = _Console(sys.stderr)
        h.setFormatter(FORMAT)
        log.addHandler(h)
    if run_dir is not None:
        if defer:
            log.addHandler(logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1))
        else:
            open_file_log(run_dir, rank)


def open_file_log(run_dir: Path, rank: int = 0) -> None:
    """Start writing <run_dir>/train.log, with whatever a deferred set-up held back."""
    fh = logging.FileHandler(Path(run_dir) / ("train.log" if rank == 0 else f"train_r{rank}.log"))
    fh.setFormatter(FORMAT)
    for h in list(log.handlers):
        if isinstance(h, logging.handlers.MemoryHandler):
            h.setTarget(fh)
            h.flush()
            log.removeHandler(h)
            h.close()
    log.addHandler(fh)


def close_logging() -> None:
    """Detach and close the log's handlers (the run folder's train.log among them)."""
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()


class MetricsWriter:
    """Appends one row per logged step to metrics.jsonl and metrics.csv. Resume-safe and lossless:
    rows past the resume step (logged after the checkpoint, or a rewound run's) are moved to
    ``metrics-after-step<N>-<time>.jsonl`` and a torn last line (a kill mid-write) to
    ``metrics-torn-<time>.jsonl``, each with a warning, so the log has no duplicates and loses nothing."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.csv = Path(run_dir) / "metrics.csv"
        kept, later, torn = _split_lines(self.jsonl, start_step)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if later:
            side = self.jsonl.with_name(f"metrics-after-step{start_step}-{stamp}.jsonl")
            _write_text(side, "".join(line + "\n" for line in later))
            log.warning(f"metrics.jsonl had {len(later)} row(s) past step {start_step}, where this run continues: "
                        f"kept in {side.name}")
        if torn:
            side = self.jsonl.with_name(f"metrics-torn-{stamp}.jsonl")
            _write_text(side, "".join(line + "\n" for line in torn))
            log.warning(f"metrics.jsonl ended in {len(torn)} line(s) that do not parse (a write cut short): moved to "
                        f"{side.name}")
        if later or torn or not self.jsonl.exists():
            _write_text(self.jsonl, "".join(line + "\n" for line in kept))
        rows = [json.loads(line) for line in kept]
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(row)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def _split_lines(path: Path, start_step: int) -> tuple[list[str], list[str], list[str]]:
    """The lines of metrics.jsonl: (rows up to ``start_step``, rows past it, lines that do not parse)."""
    if not path.exists():
        return [], [], []
    kept, later, torn = [], [], []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        row = _row(line)
        if row is None:
            torn.append(line)
        elif row["step"] <= start_step:
            kept.append(line)
        else:
            later.append(line)
    return kept, later, torn


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl (lines that do not parse, such as a torn last line, are left out)."""
    path = Path(path)
    if not path.exists():
        return []
    return [r for r in (_row(line) for line in path.read_text(errors="replace").splitlines() if line.strip())
            if r is not None]


class Progress:
    """A progress bar on stderr (tqdm when installed), or periodic log lines without a terminal."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        self.total, self.n, self.t0 = total, initial, time.time()
        _console["bar"], _console["bars"] = self, _console["bars"] + 1
        touch()
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        touch()
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix(info, refresh=False)

    def close(self) -> None:
        if _console["bar"] is self:
            _console["bar"] = None
        if self.bar is not None:
            self.bar.close()


class Heartbeat:
    """While open, a line on ``stream`` whenever the console has shown nothing for ``every`` seconds
    (a long set-up, a slow step, the final checkpoint and plot), so a run is never silent for long:
    ``... setting up (12 s)``, ``... step 41 of 256 running (31 s)``, ``... finishing (58 s)``."""

    def __init__(self, every: float = 4.0, stream=None, enabled: bool = True, clock=time.monotonic):
        self.every, self.stream, self.enabled, self.clock = every, stream, enabled, clock
        self.t0, self._stop, self._thread = clock(), None, None

    def due(self, now: float) -> str | None:
        """The line to show at ``now`` (and the console marked as active), or None while it is not due."""
        if now - _console["at"] < self.every:
            return None
        bar = _console["bar"]
        what = (f"step {bar.n + 1} of {bar.total} running" if bar is not None else
                "finishing" if _console["bars"] > self._bars else "setting up")
        _console["at"] = now
        return f"... {what} ({now - self.t0:.0f} s)"

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            bar = _console["bar"]
            line = self.due(self.clock())
            if line and bar is not None and bar.bar is not None:
                bar.bar.write(line, file=self.stream or sys.stderr)  # above the bar, which stays whole
            elif line:
                print(line, file=self.stream or sys.stderr, flush=True)

    def __enter__(self):
        import threading

        self._bars = _console["bars"]
        _console["at"] = self.t0 = self.clock()
        if self.enabled:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._loop, name="ijepa-fast-heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __exit__(self, *exc) -> None:
        self.stop()


def plot_metrics(metrics_path, out_png) -> Path | None:
    """loss.png: the loss per logged step and a smoothed curve; LR on a second axis."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return None
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    beta = 1.0 - 1.0 / max(1.0, len(loss) / 20)  # about a 20th of the run
    smooth, acc = [], 0.0
    for t, v in enumerate(loss, start=1):
        acc = beta * acc + (1 - beta) * v
        smooth.append(acc / (1 - beta**t))  # bias-corrected, so the curve starts at the first value
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, loss, color="#9ab", lw=1, label="loss")
    ax.plot(steps, smooth, color="#135", lw=2, label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if min(loss) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in rows], color="#d62", lw=1, ls="--", label="lr")
    ax2.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
