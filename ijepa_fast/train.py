"""The training loop behind ``ijepa-fast train``: data -> masks -> step -> EMA -> checkpoint.

``Trainer(cfg).run()`` trains and returns the run folder, which holds ``config.yaml`` (the
resolved config), ``train.log``, ``metrics.jsonl`` / ``metrics.csv``, ``loss.png`` and the
checkpoints ``<tag>-latest.pth.tar`` (and ``<tag>-ep<N>.pth.tar`` every ``keep_every_epochs``).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from . import __version__, perf
from .checkpoint import CheckpointError, add_prefix, load_strict, read_checkpoint, rng_state, save_atomic, set_rng_state
from .config import Config, dump_config
from .data import build_source, make_loader, transform_from_config
from .kernels.dispatch import describe as describe_kernels
from .masks import MultiBlockSampler
from .runlog import MetricsWriter, Progress, log, plot_metrics, setup_logging
from .schedules import Schedules
from .step import IJEPA, make_optimizer, train_step


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a non-finite loss); the last good checkpoint is intact."""


def describe_attention(cfg: Config, device: torch.device) -> str:
    """Which attention runs: dense / padded batches, and packed variable-length sequences."""
    from .models.varlen import resolve

    half = device.type == "cuda" and (cfg.perf.bf16_weights or cfg.run.precision in ("auto", "bf16"))
    probe = torch.empty(0, device=device, dtype=torch.bfloat16 if half else torch.float32)
    packed = resolve(cfg.model.varlen_attn, probe)
    return (f"attention: {cfg.model.attn} for dense batches; layout {cfg.model.layout}, packed sequences with "
            f"{packed}" + (" (auto)" if cfg.model.varlen_attn == "auto" else ""))


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"run.device={spec} but CUDA is not available here; use run.device=cpu or auto")
    return dev


def make_run_dir(cfg: Config, config_name: str) -> Path:
    if cfg.run.dir:
        path = Path(cfg.run.dir)
    else:
        name = cfg.run.name or f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(cfg.run.out_dir) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


class Trainer:
    def __init__(self, cfg: Config, config_name: str = "run", rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = resolve_device(cfg.run.device)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        if cfg.run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        side = cfg.data.crop_size // cfg.model.patch_size  # checked before anything is written
        self.sampler = MultiBlockSampler((side, side), cfg.mask, seed=cfg.run.seed, rank=rank)
        self.run_dir = make_run_dir(cfg, config_name)
        setup_logging(self.run_dir, rank)
        dump_config(cfg, self.run_dir / "config.yaml")
        self.source = build_source(cfg.data, cfg.run.seed)
        self.steps_per_epoch = len(self.source) // (cfg.data.batch_size * world)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.source)} images are fewer than one global batch of "
                             f"{cfg.data.batch_size * world}; lower data.batch_size")
        torch.manual_seed(cfg.run.seed)
        self.model = IJEPA.from_config(cfg).to(self.device)
        o = cfg.optim
        self.optimizer = make_optimizer(self.model, o.lr, o.weight_decay, o.betas, o.eps,
                                        perf.optimizer_impl(cfg.perf, self.device))
        self.schedules = Schedules.from_config(o, self.steps_per_epoch)
        self.step = 0
        self.latest = self.run_dir / f"{cfg.run.tag}-latest.pth.tar"
        self._describe()
        self._maybe_resume()
        # the speed-ups, after resuming: a bf16 compute copy must start from the loaded weights
        self.run_model, self.master = perf.apply(self.model, cfg.perf, self.device)

    # -- set-up
    def _describe(self):
        c, m = self.cfg, self.model
        n_enc = sum(p.numel() for p in m.encoder.parameters())
        n_pred = sum(p.numel() for p in m.predictor.parameters())
        log.info(f"ijepa-fast {__version__} | torch {torch.__version__} | device {self.device} | "
                 f"precision {c.run.precision} | threads {torch.get_num_threads()}")
        log.info(describe_kernels(c.model.kernels, self.device) + (" | deterministic" if c.run.deterministic else ""))
        log.info(describe_attention(c, self.device))
        native = self.sampler.native()  # built (once, cached) before data-loader workers fork
        log.info(f"mask sampler: {'compiled (csrc/)' if native is not None else 'Python'}, mode {c.mask.mode}")
        log.info(f"run folder: {self.run_dir}")
        log.info(f"model {c.model.name}/{c.model.patch_size} at {c.data.crop_size}px (grid {m.grid[0]}x{m.grid[1]}): "
                 f"encoder {n_enc / 1e6:.2f}M params, predictor {n_pred / 1e6:.2f}M "
                 f"({c.model.pred_depth}x{c.model.pred_dim}); attention {c.model.attn}; loss {c.optim.loss}")
        log.info(f"data: {self.source.root}: {len(self.source)} images, batch {c.data.batch_size} x {self.world} "
                 f"processes = {c.data.batch_size * self.world}; {self.steps_per_epoch} steps/epoch x {c.optim.epochs} "
                 f"epochs; masks {c.mask.mode}")

    def _resume_path(self) -> Path | None:
        r = self.cfg.run.resume
        if r is None or r == "":
            return None
        if r == "auto":
            return self.latest if self.latest.exists() else None
        return Path(r)

    def _maybe_resume(self):
        path = self._resume_path()
        if path is None:
            return
        ckpt = read_checkpoint(path)
        for name in ("encoder", "predictor", "target_encoder"):
            if name not in ckpt:
                raise CheckpointError(f"{path} has no {name!r} entry; cannot resume from it")
            load_strict(getattr(self.model, name), ckpt[name], name)
        if ckpt.get("opt") is not None:
            try:
                self.optimizer.load_state_dict(ckpt["opt"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: optimiser state does not fit this model ({e})") from None
        extra = ckpt.get("ijepa_fast")
        if extra:
            self.step = int(extra["step"])
            self.sampler.load_state_dict(extra["sampler"])
            set_rng_state(extra["rng"])
            if extra.get("global_batch") not in (None, self.cfg.data.batch_size * self.world):
                log.warning(f"the checkpoint was trained with a global batch of {extra['global_batch']}, this run uses "
                            f"{self.cfg.data.batch_size * self.world}: data order and schedules shift")
        else:  # a published checkpoint: the reference resumes at the start of the saved epoch
            self.step = int(ckpt.get("epoch", 0)) * self.steps_per_epoch
            self.sampler.step = self.step
        log.info(f"resumed from {path} at step {self.step} (epoch {self.step / self.steps_per_epoch:.2f})")

    # -- checkpoints
    def save(self, loss_avg: float) -> Path:
        c = self.cfg
        m = self.model
        self.sampler.step = self.step  # workers drew by step number; the next draw is this step's
        epoch = self.step // self.steps_per_epoch
        state = {
            "encoder": add_prefix(m.encoder.state_dict()),
            "predictor": add_prefix(m.predictor.state_dict()),
            "target_encoder": add_prefix(m.target_encoder.state_dict()),
            "opt": self.optimizer.state_dict(),
            "scaler": None,
            "epoch": epoch,
            "loss": loss_avg,
            "batch_size": c.data.batch_size,
            "world_size": self.world,
            "lr": c.optim.lr,
            "ijepa_fast": {
                "version": __version__, "step": self.step, "sampler": self.sampler.state_dict(), "rng": rng_state(),
                "data": {"epoch": epoch, "batch": self.step % self.steps_per_epoch},
                "global_batch": c.data.batch_size * self.world, "num_heads": m.encoder.num_heads,
                "pred_heads": m.predictor.predictor_blocks[0].attn.num_heads if len(m.predictor.predictor_blocks)
                else None, "config": c.to_dict(),
            },
        }
        if self.rank == 0:
            save_atomic(state, self.latest)
            keep = c.run.keep_every_epochs
            if keep and self.step % self.steps_per_epoch == 0 and epoch % keep == 0 and epoch > 0:
                save_atomic(state, self.run_dir / f"{c.run.tag}-ep{epoch}.pth.tar")
        return self.latest

    def _checkpoint_due(self) -> bool:
        every = self.cfg.run.checkpoint_every
        if every:
            return self.step % every == 0
        return self.step % self.steps_per_epoch == 0

    # -- the loop
    def run(self) -> Path:
        c = self.cfg
        total = c.optim.epochs * self.steps_per_epoch
        stop = min(total, c.run.max_steps) if c.run.max_steps else total
        if self.step >= stop:
            log.info(f"nothing to do: the run is at step {self.step} of {stop}")
            return self.run_dir
        loader = self._loader(stop)
        writer = MetricsWriter(self.run_dir, self.step)
        bar = Progress(stop, self.step, c.run.progress and self.rank == 0)
        losses, skipped, saved_at, t_start, first = [], 0, -1, time.time(), self.step
        t_last, logged_at = time.time(), self.step
        try:
            for batch in loader:
                res = self._one_step(batch)
                self.step = batch.step + 1
                losses.append(res.loss)
                skipped += len(batch.skipped)
                if batch.skipped:
                    log.warning(f"skipped {len(batch.skipped)} unusable image(s) (total {skipped}): "
                                f"{', '.join(batch.skipped[:3])}")
                bar.update(1, loss=f"{res.loss:.4f}", lr=f"{res.lr:.2e}")
                if self.step % c.run.log_every == 0 or self.step == stop:
                    now = time.time()
                    writer.write(self._row(batch, res, (now - t_last) / (self.step - logged_at), skipped))
                    t_last, logged_at = now, self.step
                if self._checkpoint_due():
                    self.save(sum(losses[-self.steps_per_epoch:]) / len(losses[-self.steps_per_epoch:]))
                    saved_at = self.step
        finally:
            bar.close()
        if saved_at != self.step:
            self.save(sum(losses[-50:]) / len(losses[-50:]))
        elapsed = time.time() - t_start
        done = self.step - first
        log.info(f"finished {done} steps in {elapsed:.1f}s ({done * c.data.batch_size * self.world / elapsed:.1f} "
                 f"images/s); loss {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                 f"(mean of the last 10); skipped images: {skipped}")
        if c.run.plot and self.rank == 0:
            png = plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            if png:
                log.info(f"loss plot: {png}")
        log.info(f"checkpoint: {self.latest}")
        return self.run_dir

    def _loader(self, stop: int):
        """DALI or the PIL loader (data.loader), over steps self.step .. stop-1."""
        from .data import dali
        from .data.images import FolderImages

        c = self.cfg
        transform = transform_from_config(c.data, c.run.seed)
        want = c.data.loader
        version = dali.available()
        folder = isinstance(self.source, FolderImages)
        use = want == "dali" or (want == "auto" and self.device.type == "cuda")
        if use and (version is None or not folder):
            if want == "dali":
                log.warning("data.loader=dali but " + ("DALI is not installed (pip install nvidia-dali-cuda130)"
                                                       if version is None else "the data is not an image folder")
                            + "; using the PIL loader")
            use = False
        if use:
            log.info(f"data loader: DALI {version}, decoding on the {'GPU' if self.device.type == 'cuda' else 'CPU'}")
            return dali.DaliLoader(self.source, c.data, self.sampler, c.data.batch_size, self.step, stop, c.run.seed,
                                   self.rank, self.world, self.device, max(1, self._workers()), transform)
        log.info(f"data loader: Pillow in {self._workers()} worker process(es)")
        return make_loader(self.source, transform, self.sampler, c.data.batch_size, self.step, stop, c.run.seed,
                           self.rank, self.world, self._workers(), c.data.pin_memory and self.device.type == "cuda")

    def _workers(self) -> int:
        want = self.cfg.data.num_workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if want > cpus:
            log.info(f"data.num_workers={want} exceeds the {cpus} CPUs here; using {cpus}")
            return cpus
        return want

    def _one_step(self, batch):
        images = batch.images.to(self.device, non_blocking=True)
        # packing (when the layout says so) is integer bookkeeping, done here on the CPU
        masks = self.run_model.prepare(batch.masks).to(self.device, non_blocking=True)
        try:
            return train_step(self.model, self.optimizer, images, masks, batch.step, self.schedules,
                              self.cfg.run.precision, self.cfg.optim.grad_clip, self.master)
        except FloatingPointError as e:
            last = f"{self.latest}" if self.latest.exists() else "none written yet"
            log.error(f"{e}: stopping. The model and optimiser were not updated by this step; the last good "
                      f"checkpoint is {last}. Resume from it with a lower optim.lr or optim.grad_clip set.")
            raise TrainingStopped(str(e)) from None

    def _row(self, batch, res, sec_per_step: float, skipped: int) -> dict:
        ctx, tgt = batch.masks.mean_tokens()
        row = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), "loss": res.loss, "lr": res.lr,
               "wd": res.wd, "momentum": res.momentum, "grad_norm": res.grad_norm, "ctx_tokens": ctx,
               "tgt_tokens": tgt, "step_ms": round(sec_per_step * 1e3, 2),
               "images_per_s": round(self.cfg.data.batch_size * self.world / sec_per_step, 1) if sec_per_step else None,
               "skipped": skipped}
        if self.device.type == "cuda":
            row["mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        if not math.isfinite(res.loss):
            row["loss"] = None
        return row


def train(cfg: Config, config_name: str = "run") -> Path:
    """Train as ``cfg`` says and return the run folder."""
    return Trainer(cfg, config_name).run()
