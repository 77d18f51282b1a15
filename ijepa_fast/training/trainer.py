"""The training loop behind ``ijepa-fast train``: data -> masks -> step -> EMA -> checkpoint.

``Trainer(cfg).run()`` trains and returns the run folder, which holds ``config.yaml`` (the
resolved config), ``train.log``, ``metrics.jsonl`` / ``metrics.csv``, ``loss.png`` and the
checkpoints (see ``train_state``). It runs as one process, or as one of many under ``torchrun``
or ``srun`` (see ``distributed``). It resumes from the run folder's newest checkpoint, checkpoints
and exits cleanly on SIGTERM / SIGUSR1 / a first Ctrl-C, and stops on a non-finite loss before anything is updated.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from .._compat import keyword_only
from ..checkpoint.format import training_checkpoint
from ..checkpoint.run_files import CheckpointManager, load_for_resume
from ..checkpoint.states import head_counts, read_resume_entry, resume_entry
from ..config import Config
from ..config.validate import config_warnings
from ..data import build_loader, build_source
from ..errors import ConfigError, DataError, TrainingStopped
from ..masks import MultiBlockSampler
from ..runlog.loggers import check_available, open_loggers
from ..runlog.output import Progress, close_logging, log, open_file_log, plot_metrics, setup_logging
from . import distributed
from .batching import batch_warning, plan_batch, with_plan
from .engine import Engine
from .monitor import CollapseMonitor
from .run_folder import (
    check_history,
    check_room,
    checkpoint_bytes,
    make_run_dir,
    move_aside,
    record_config,
    remove_if_created,
)
from .run_lock import RunLock
from .schedules import Schedules
from .setup import describe_run, resolve_device, scaled_optim
from .step import read_results

try:
    import resource  # peak memory of the process on the CPU
except ImportError:  # not on Windows
    resource = None

MAX_SKIPPED_IN_A_ROW = 10


class Trainer:
    @keyword_only(3, ("source", "env"))
    def __init__(self, cfg: Config, config_name: str = "run", *, source=None, env: distributed.DistEnv | None = None,
                 resume_command: str | None = None, force: bool = False):
        """``source``: an image source to train on instead of the one ``cfg.data`` names (anything
        with ``__len__``, ``load(i)`` -> RGB PIL image or None, ``name(i)`` and optional ``labels``).
        ``env``: the process's place among several (default: read from the launcher's variables).
        ``resume_command``: the command line that continues this run, for messages (the CLI's).
        ``force``: start over in (or rewind) a run folder that holds a run (see ``run_folder.check_history``).
        ``stopped_by`` is set to the signal's name when a signal stops the run."""
        self.cfg = self.settings = cfg  # settings: as given; cfg: in per-process terms (batching.with_plan)
        self.resume_command = resume_command
        self.stopped_by = None
        self.lock = None
        check_available(cfg.run.loggers)  # a chosen logger that is not installed: an error before any work
        self._setup_process(env)
        self._setup_run_folder(config_name)
        try:  # a failure here leaves nothing behind: no config.yaml rewritten, no new run folder
            self._setup_data(source)
            self._setup_model()
            self.ckpt = CheckpointManager(self.run_dir, cfg.run.tag, cfg.run.keep_last, cfg.run.keep_every_epochs,
                                          sharded=self.strategy == "fsdp", rank=self.rank)
            self.step = 0
            self._skips = 0  # non-finite steps skipped in a row (optim.on_nonfinite=skip)
            before = self._maybe_resume()
            history = check_history(self.run_dir, cfg.run.tag, cfg.run.resume, self.resumed_from, self.step,
                                    force) if self.rank == 0 else None
        except BaseException:
            close_logging()
            self.release()
            if self.rank == 0:
                remove_if_created(self.run_dir, self._created_run_dir)
            raise
        if history == "move":
            log.warning(f"--force: the earlier run's files were moved to {move_aside(self.run_dir)}")
        elif history == "rewind":
            log.warning(f"--force: rewinding {self.run_dir} to step {self.step}; the later step checkpoints were "
                        f"moved to {move_aside(self.run_dir, after_step=self.step)}")
        open_file_log(self.run_dir, self.rank)
        if self.rank == 0:
            changed = record_config(self.run_dir, self.settings.to_dict(), resumed=before is not None,
                                    before=before or None, step=self.step)
            if changed:
                log.warning(f"resumed with changed settings: {', '.join(changed)} (config.yaml keeps the run's first "
                            f"settings; the changes are recorded in config_history.yaml)")
        if self.master is not None:
            self.master.sync_params()  # the bf16 copy starts from the (possibly loaded) masters

    # -- set-up
    def _setup_process(self, env):
        """This process: its rank, device, threads, determinism, the process group and the sampler."""
        c = self.cfg
        self.env = env or distributed.read_env()
        self.rank, self.world = self.env.rank, self.env.world
        self.batch = plan_batch(c.data, c.optim, self.world)
        self.cfg = c = with_plan(c, self.batch)
        self.device = resolve_device(c.run.device, self.env)
        if c.run.threads:
            torch.set_num_threads(c.run.threads)
        if c.run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        side = c.data.crop_size // c.model.patch_size  # checked before anything is written
        self.sampler = MultiBlockSampler((side, side), c.mask, seed=c.run.seed, rank=self.rank, world=self.world)
        distributed.init(self.env, self.device, c.dist.backend)

    def _setup_run_folder(self, config_name: str):
        self.run_dir, self._created_run_dir = make_run_dir(self.cfg, config_name)
        setup_logging(self.run_dir, self.rank, defer=True)  # train.log is written once set-up has succeeded
        if self.rank == 0:
            self.lock = RunLock(self.run_dir)
            try:
                self.lock.acquire()
            except BaseException:
                close_logging()
                remove_if_created(self.run_dir, self._created_run_dir)
                raise
        for warning in config_warnings(self.cfg):
            log.warning(warning)

    def release(self) -> None:
        """Give back the run folder's lock (at the end of the run; also done at exit)."""
        if self.lock is not None:
            self.lock.release()

    def _setup_data(self, source):
        """The image source, the global batch, the epoch length and the schedules."""
        c = self.cfg
        self.source = source if source is not None else build_source(c.data, c.run.seed)
        self.global_batch = self.batch.global_batch
        self.steps_per_epoch = len(self.source) // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"{len(self.source)} images are fewer than one global batch of {self.global_batch}; "
                            f"lower {'data.global_batch' if self.settings.data.global_batch else 'data.batch_size'}")
        warning = batch_warning(self.batch, c.optim)
        if warning:
            log.warning(warning)
        span = int(c.optim.ipe_scale * c.optim.epochs * self.steps_per_epoch)
        if span < 1:
            raise ConfigError(f"optim.ipe_scale={c.optim.ipe_scale}: the schedules would span {span} steps "
                              f"(optim.epochs={c.optim.epochs} x {self.steps_per_epoch} steps per epoch x ipe_scale); "
                              f"raise optim.ipe_scale or optim.epochs")
        self.optim, self.lr_factor = scaled_optim(c, self.global_batch)
        self.schedules = Schedules.from_config(self.optim, self.steps_per_epoch)

    def _setup_model(self):
        """The run's step, assembled by ``Engine.from_config`` (model -> perf switches -> DDP / FSDP ->
        optimiser -> fused tail, in the engine's one order); the config keeps the resolved switches."""
        c = self.cfg
        self.engine = e = Engine.from_config(c, device=self.device, schedules=self.schedules, optim=self.optim,
                                             sampler=self.sampler)
        self.cfg = dataclasses.replace(c, perf=e.perf)  # config.yaml and checkpoints record the resolved values
        self.settings = dataclasses.replace(self.settings, perf=e.perf)
        self.model, self.optimizer, self.run_model, self.master, self.tail = (e.model, e.optimizer, e.run_model,
                                                                              e.master, e.tail)
        self.strategy, self.deferred, self._halt = e.strategy, e.deferred, e.halt
        describe_run(self.cfg, self.device, self.model, native_sampler=self.sampler.native() is not None,
                     run_dir=self.run_dir, data=(getattr(self.source, "root", None), len(self.source)),
                     world=self.world, steps_per_epoch=self.steps_per_epoch, peak_lr=self.schedules.lr,
                     lr_factor=self.lr_factor, strategy=self.strategy)
        if self.rank == 0:
            check_room(self.run_dir, checkpoint_bytes(self.model))

    def _maybe_resume(self) -> dict | None:
        """Load the checkpoint run.resume names (auto: this folder's newest readable one); returns its
        settings ({} for a published checkpoint), or None when the run starts fresh."""
        loaded = load_for_resume(self.ckpt, self.cfg.run.resume, self.model, self.optimizer, self.rank)
        self.resumed_from = loaded[0] if loaded is not None else None
        if loaded is None:
            return None
        path, extra = loaded
        point = read_resume_entry(extra, self.steps_per_epoch)
        self.step = point.step
        if point.sampler is not None:
            self.sampler.load_state_dict(point.sampler)
        else:  # a published checkpoint: its masks restart at the step it resumes at
            self.sampler.step = self.step
        if point.global_batch not in (None, self.global_batch):
            log.warning(f"the checkpoint was trained with a global batch of {point.global_batch}, this run "
                        f"uses {self.global_batch}: data order and schedules shift")
        log.info(f"resumed from {path} at step {self.step} (epoch {self.step / self.steps_per_epoch:.2f})")
        return point.config

    # -- checkpoints
    def train_state(self) -> dict:
        """What an exact resume needs besides the weights and the optimiser (``checkpoint.states``)."""
        return resume_entry(version=__version__, step=self.step, steps_per_epoch=self.steps_per_epoch,
                            sampler_state=self.sampler.state_dict(), global_batch=self.global_batch,
                            heads=head_counts(self.model), config=self.settings.to_dict())

    def save(self, loss_avg: float) -> Path:
        self.sampler.step = self.step  # workers drew by step number; the next draw is this step's
        epoch = self.step // self.steps_per_epoch
        extra = self.train_state()
        if self.ckpt.sharded:
            return self.ckpt.save_sharded(self.model, self.optimizer, extra, self.step)
        state = training_checkpoint(self.model, self.optimizer, epoch=epoch, loss=loss_avg,
                                    batch_size=self.cfg.data.batch_size, world_size=self.world, lr=self.cfg.optim.lr,
                                    extra=extra)
        return self.ckpt.save_file(state, self.step, epoch, self.step % self.steps_per_epoch == 0)

    def _checkpoint_due(self) -> bool:
        every = self.cfg.run.checkpoint_every
        return self.step % (every or self.steps_per_epoch) == 0

    # -- the loop
    def run(self) -> Path:
        """Train to the end of the run (or ``run.max_steps``), checkpointing as configured; returns the run
        folder, whose lock is given back at the end."""
        try:
            return self._train_loop()
        finally:
            self.release()

    def _train_loop(self) -> Path:
        c = self.cfg
        total = c.optim.epochs * self.steps_per_epoch
        stop = min(total, c.run.max_steps) if c.run.max_steps else total
        if self.step >= stop:
            log.info(f"nothing to do: the run is at step {self.step} of {stop}")
            return self.run_dir
        self.engine.warm_up(c.data.batch_size, self.step)
        loader = self.make_loader(stop)
        self.monitor = CollapseMonitor(self.source, c.data.crop_size, c.run, seed=c.run.seed, device=self.device)
        writer = open_loggers(c, self.run_dir, self.step) if self.rank == 0 else None  # metrics.jsonl and others
        bar = Progress(stop, self.step, c.run.progress and self.rank == 0)
        loop = _Loop(first=self.step, t_start=time.time(), t_last=time.time(), logged_at=self.step)
        ended = "failed"  # how the loggers see the run end: finished, stopped (a signal) or failed
        with distributed.StopSignals() as signals:
            try:
                for batch in loader:
                    res = self._one_step(batch)
                    self.step = batch.step + 1
                    if res is not None and res.deferred:
                        loop.pending.append((batch.step, res))
                        due = self.step % c.run.log_every == 0 or self.step == stop or self.monitor.due(self.step)
                        res = self._settle(loop) if due else None
                    self._record(batch, res, loop, bar)
                    self._log_row(batch, res, loop, writer, stop)
                    if self._checkpoint_due():
                        self._save(loop, self.steps_per_epoch)
                    if distributed.any_rank(signals.received is not None, self.device):
                        self._stop_on_signal(signals.received, loop)
                        ended = "stopped"
                        return self.run_dir
                ended = "finished"
            finally:
                bar.close()
                if writer:
                    writer.close(ended)
        if loop.saved_at != self.step:
            self._save(loop, 50)
        self._summary(loop)
        return self.run_dir

    def _record(self, batch, res, loop: _Loop, bar) -> None:
        """The step's loss and the images its batch had to skip."""
        if res is not None:
            loop.losses.append(res.loss)
            bar.update(1, loss=f"{res.loss:.4f}", lr=f"{res.lr:.2e}")
        else:
            bar.update(1)
        loop.skipped_images += len(batch.skipped)
        if batch.skipped:
            log.warning(f"skipped {len(batch.skipped)} unusable image(s) (total {loop.skipped_images}): "
                        f"{', '.join(batch.skipped[:3])}")

    def _log_row(self, batch, res, loop: _Loop, writer, stop: int) -> None:
        """A metrics row every run.log_every steps, at the last step, and whenever the monitor measured."""
        monitored = self.monitor.measure(self.model) if self.monitor.due(self.step) else {}
        if res is None or not (self.step % self.cfg.run.log_every == 0 or self.step == stop or monitored):
            return
        now = time.time()
        row = self._row(batch, res, (now - loop.t_last) / (self.step - loop.logged_at), loop.skipped_images)
        if writer:
            writer.write({**row, **monitored})
        loop.t_last, loop.logged_at = now, self.step

    def _save(self, loop: _Loop, recent: int) -> None:
        """Checkpoint, with the mean of the last ``recent`` losses (deferred values read first)."""
        last = self._settle(loop)
        if last is not None:
            loop.losses.append(last.loss)
        self.save(_mean(loop.losses[-recent:]))
        loop.saved_at = self.step

    def _settle(self, loop: _Loop):
        """Read the deferred step results (one host synchronisation); keep all but the last loss
        and return the last result, or None. A non-finite step among them stops the run."""
        pending, loop.pending = loop.pending, []
        try:
            done = read_results(pending)
        except FloatingPointError as e:
            # the weights are those of the step before the bad one: the trainer says so, and no later step stays halted
            self.step = getattr(e, "step", self.step)
            self._halt.zero_()
            raise self._stopped(e, "this step or the ones after it") from None
        loop.losses.extend(r.loss for r in done[:-1])
        return done[-1] if done else None

    def _stop_on_signal(self, received: str | None, loop: _Loop) -> None:
        """A preemption notice on any process: checkpoint (once) and say how to continue."""
        if loop.saved_at != self.step:
            self._save(loop, 50)
        self.stopped_by = received or "a stop signal on another process"
        log.warning(f"{received or 'a stop signal on another process'}: checkpoint at step {self.step} written "
                    f"({self.ckpt.latest}); exiting. To resume: {self.resume_hint()}")

    def resume_hint(self) -> str:
        """The command that continues this run (in this run folder), for messages."""
        cmd = self.resume_command or "ijepa-fast train CONFIG [overrides]"
        if "run.resume=" in cmd:  # the run continues from its own newest checkpoint (run.resume=auto)
            cmd = " ".join(shlex.quote(a) for a in shlex.split(cmd) if not a.startswith("run.resume="))
        if "--run-dir" not in cmd and "run.dir=" not in cmd:
            cmd += f" --run-dir {shlex.quote(str(self.run_dir))}"
        if self.world > 1:
            cmd += " (under the same launcher)"
        return cmd

    def make_loader(self, stop: int):
        """The batches of steps self.step .. stop-1 of this process."""
        c = self.cfg
        return build_loader(self.source, c.data, self.sampler, start=self.step, stop=stop, seed=c.run.seed,
                            rank=self.rank, world=self.world, device=self.device, workers=self._workers(), log=log)

    def _summary(self, loop: _Loop):
        c = self.cfg
        elapsed = time.time() - loop.t_start
        done = self.step - loop.first
        if loop.losses:
            log.info(f"finished {done} steps in {elapsed:.1f}s ({done * self.global_batch / elapsed:.1f} images/s); "
                     f"loss {loop.losses[0]:.4f} -> {_mean(loop.losses[-10:]):.4f} (mean of the last 10); skipped "
                     f"images: {loop.skipped_images}")
        if c.run.plot and self.rank == 0:
            png = plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            if png:
                log.info(f"loss plot: {png}")
        log.info(f"checkpoint: {self.ckpt.latest}")

    def _workers(self) -> int:
        want = self.cfg.data.num_workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if want > cpus:
            log.info(f"data.num_workers={want} exceeds the {cpus} CPUs here; using {cpus}")
            return cpus
        return want

    def _one_step(self, batch):
        try:
            res = self.engine.step(batch.images, batch.step, batch.masks)
            self._skips = 0
            return res
        except FloatingPointError as e:
            if self.cfg.optim.on_nonfinite == "skip" and self._skips < MAX_SKIPPED_IN_A_ROW:
                self._skips += 1
                log.warning(f"{e}: step skipped (optim.on_nonfinite=skip; {self._skips} in a row)")
                return None
            raise self._stopped(e, "this step") from None

    def _stopped(self, e: FloatingPointError, steps: str) -> TrainingStopped:
        last = self.ckpt.find_latest()
        where = (f"the last good checkpoint, {last}, is intact; resume from it with a lower optim.lr or "
                 f"optim.grad_clip set: {self.resume_hint()} optim.lr=... optim.grad_clip=..." if last else
                 "no checkpoint had been written yet; start again with a lower optim.lr or optim.grad_clip set")
        log.error(f"{e}: stopping. Nothing was updated by {steps}; {where}")
        return TrainingStopped(f"{e}; {where}")

    def _row(self, batch, res, sec_per_step: float, skipped: int) -> dict:
        ctx, tgt = batch.masks.mean_tokens()
        loss = distributed.all_reduce_mean(res.loss, self.device)  # the global batch's loss, for the log
        row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "loss": loss, "lr": res.lr,
               "wd": res.wd, "momentum": res.momentum, "grad_norm": res.grad_norm, "ctx_tokens": ctx,
               "tgt_tokens": tgt, "step_ms": round(sec_per_step * 1e3, 2),
               "images_per_s": round(self.global_batch / sec_per_step, 1) if sec_per_step else None,
               "skipped": skipped}
        if self.device.type == "cuda":
            row["mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        elif resource is not None:  # the CPU: the process's peak resident memory
            row["mem_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        if not math.isfinite(loss):
            row["loss"] = None
        return row


@dataclass
class _Loop:
    """The training loop's bookkeeping."""

    first: int  # the step the loop started at
    t_start: float
    t_last: float  # when the last metrics row was written
    logged_at: int  # the step of the last metrics row
    losses: list = field(default_factory=list)
    pending: list = field(default_factory=list)  # deferred (step, StepResult) not read yet
    skipped_images: int = 0
    saved_at: int = -1  # the step of the last checkpoint this loop wrote


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def train(cfg: Config, config_name: str = "run", *, source=None, resume_command: str | None = None,
          force: bool = False) -> Path:
    """Train as ``cfg`` says (on ``source`` if given) and return the run folder."""
    return run_trainer(Trainer(cfg, config_name, source=source, resume_command=resume_command, force=force))


def run_trainer(trainer: Trainer) -> Path:
    """``trainer.run()``, then the run folder's lock given back and the process group closed."""
    try:
        return trainer.run()
    except (ConfigError, DataError):  # the data failed before a checkpoint: a folder this command made goes again
        if trainer.rank == 0:
            close_logging()
            remove_if_created(trainer.run_dir, trainer._created_run_dir)
        raise
    finally:
        trainer.release()
        distributed.shutdown()
