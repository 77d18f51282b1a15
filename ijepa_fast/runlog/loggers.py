"""Where a run's metric rows go: metrics.jsonl / metrics.csv always, TensorBoard and Weights & Biases on request.

``run.loggers`` lists them (``jsonl``, ``tensorboard``, ``wandb``). ``metrics.jsonl`` is the source of
truth (the loss plot, the summary and resuming read it), so it is written whether or not the list
names it. The others receive the same rows at the same steps, each number as a scalar
``train/<column>`` at the row's step; they run on rank 0 only and close when the run ends, stops on a
signal or stops on a non-finite value. Their packages are imported only when chosen;
``check_available`` turns a missing one into a ``ConfigError`` naming the pip extra before any work.
"""
from __future__ import annotations

import importlib.util
import math
import secrets
import string
from pathlib import Path

from ..errors import ConfigError
from .output import MetricsWriter, log

CHOICES = ("jsonl", "tensorboard", "wandb")
# logger -> (the module it needs, the pip extra that installs it)
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
PREFIX = "train/"
WANDB_ID_FILE = "wandb_run_id"  # in the run folder: a resumed run continues the same W&B run


def check_available(names) -> None:
    """A ConfigError naming the pip extra for every chosen logger whose package is not installed."""
    for name in names:
        if name in NEEDS:
            module, extra = NEEDS[name]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"run.loggers: {name} needs the {module} package, which is not installed: "
                                  f"pip install 'ijepa-fast[{extra}]' (or pip install {module}), or leave {name} "
                                  f"out of run.loggers")


def scalars(row: dict) -> dict:
    """The row's numbers as ``train/<column>`` scalars (the step is the x axis; missing values are left out)."""
    out = {}
    for k, v in row.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[PREFIX + k] = v
    return out


class TensorBoardLogger:
    """Event files in <run dir>/tensorboard (torch.utils.tensorboard); a resumed run drops the old
    events after its start step, as metrics.jsonl drops its rows."""

    def __init__(self, run_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=start_step + 1 if start_step else None)
        log.info(f"TensorBoard: {self.dir} (tensorboard --logdir {self.dir})")

    def write(self, row: dict) -> None:
        for tag, v in scalars(row).items():
            self.writer.add_scalar(tag, v, row["step"])
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run in <run dir>/wandb, named after the run folder, with the resolved config.
    Its id is kept in <run dir>/wandb_run_id, so a resumed run continues the same W&B run."""

    def __init__(self, run_dir: Path, *, config: dict, project: str, entity: str | None, mode: str):
        import wandb

        id_file = Path(run_dir) / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if not run_id:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # as W&B's
            id_file.write_text(run_id + "\n")
        mode = None if mode == "auto" else mode  # None: wandb reads $WANDB_MODE (default online)
        self.run = wandb.init(dir=str(run_dir), project=project, entity=entity, name=Path(run_dir).name,
                              config=config, id=run_id, resume="allow", mode=mode,
                              settings=wandb.Settings(silent=True))  # its banner would interleave with the log
        where = getattr(self.run, "url", None) or f"{Path(run_dir) / 'wandb'} (upload with wandb sync)"
        log.info(f"Weights & Biases: run {run_id}, {self.run.settings.mode}: {where}")

    def write(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self, status: str) -> None:
        if status == "stopped":
            self.run.mark_preempting()  # a preemption: the run continues on resume
        self.run.finish(exit_code=1 if status == "failed" else 0)


class RunLoggers:
    """The metrics writer (metrics.jsonl / .csv) and the chosen extra loggers, fed the same rows."""

    def __init__(self, writer: MetricsWriter, extras: list):
        self.writer, self.extras = writer, extras

    def write(self, row: dict) -> None:
        self.writer.write(row)  # first: the source of truth
        for lg in self.extras:
            lg.write(row)

    def close(self, status: str = "finished") -> None:
        """``status``: 'finished', 'stopped' (a stop signal) or 'failed' (a non-finite value, an error)."""
        for lg in self.extras:
            try:
                lg.close(status)
            except Exception as e:  # never let a logger's shutdown hide how the run ended
                log.warning(f"closing the {type(lg).__name__} failed: {e}")
        self.extras = []


def open_loggers(cfg, run_dir: Path, start_step: int) -> RunLoggers:
    """metrics.jsonl / .csv (rows after ``start_step`` dropped) and the loggers ``cfg.run.loggers`` names."""
    r = cfg.run
    check_available(r.loggers)
    writer = MetricsWriter(run_dir, start_step)
    extras = []
    try:
        if "tensorboard" in r.loggers:
            extras.append(TensorBoardLogger(run_dir, start_step))
        if "wandb" in r.loggers:
            extras.append(WandbLogger(run_dir, config=cfg.to_dict(), project=r.wandb_project, entity=r.wandb_entity,
                                      mode=r.wandb_mode))
    except BaseException:
        RunLoggers(writer, extras).close("failed")
        raise
    return RunLoggers(writer, extras)
