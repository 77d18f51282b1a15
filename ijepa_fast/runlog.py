"""What a run writes as it goes: metric rows (JSONL and CSV), a progress bar, a loss plot."""
from __future__ import annotations

import csv
import json
import logging
import logging.handlers
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
    """Appends one row per logged step to metrics.jsonl and metrics.csv (resume-safe: rows at or
    after the resume step are dropped first, so a resumed run's log has no duplicates)."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.csv = Path(run_dir) / "metrics.csv"
        rows = [r for r in read_metrics(self.jsonl) if r["step"] <= start_step]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(self.csv, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def write(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS, extrasaction="ignore").writerow(row)


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
