"""The checkpoints of a run folder: naming, linking, pruning, and the sharded (FSDP) files.

The format itself (what a checkpoint holds, how it is read) is ``checkpoint``'s. One file (single
process, DDP): ``<tag>-step<N>.pth.tar``, written atomically by rank 0; ``<tag>-latest.pth.tar``
is a hard link to the newest, replaced atomically; the newest ``run.keep_last`` step files are
kept, and ``<tag>-ep<E>.pth.tar`` every ``run.keep_every_epochs`` epochs.

Sharded (FSDP): ``<tag>-step<N>.dcp/``, written by every rank with ``torch.distributed.checkpoint``
(models and optimiser, sharded; loadable at another world size, a single process included), plus
``train.pt`` (step, sampler, config) and one RNG file per rank; ``<tag>-latest.dcp`` names the
newest directory and is replaced atomically once every rank has finished writing.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError, CheckpointUnreadable
from ..runlog.output import log
from ..training import distributed
from .format import load_training_checkpoint, resolve, rng_state, save_atomic, set_rng_state


class CheckpointManager:
    def __init__(self, run_dir: Path, tag: str, keep_last: int = 2, keep_every_epochs: int = 0,
                 sharded: bool = False, rank: int = 0):
        self.dir, self.tag, self.sharded, self.rank = Path(run_dir), tag, sharded, rank
        self.keep_last, self.keep_every = max(1, keep_last), keep_every_epochs

    @property
    def latest(self) -> Path:
        return self.dir / (f"{self.tag}-latest.dcp" if self.sharded else f"{self.tag}-latest.pth.tar")

    def find_latest(self) -> Path | None:
        """The newest checkpoint of this run folder (either kind), or None."""
        for p in (self.dir / f"{self.tag}-latest.dcp", self.dir / f"{self.tag}-latest.pth.tar"):
            if p.exists():
                return resolve(p)
        return None

    def older(self) -> list[Path]:
        """The run folder's one-file step checkpoints, newest first (fallbacks for a torn latest)."""
        return sorted(self.dir.glob(f"{self.tag}-step*.pth.tar"), reverse=True)

    # -- one file
    def save_file(self, state: dict, step: int, epoch: int, epoch_end: bool) -> Path:
        path = self.dir / f"{self.tag}-step{step:08d}.pth.tar"
        if self.rank == 0:
            save_atomic(state, path)
            _link_atomic(path, self.dir / f"{self.tag}-latest.pth.tar")
            if self.keep_every and epoch_end and epoch > 0 and epoch % self.keep_every == 0:
                _link_atomic(path, self.dir / f"{self.tag}-ep{epoch}.pth.tar")
            self._prune(sorted(self.dir.glob(f"{self.tag}-step*.pth.tar")), lambda p: p.unlink())
        distributed.barrier()
        return path

    # -- sharded
    def save_sharded(self, model, optimizer, train_state: dict, step: int) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = self.dir / f"{self.tag}-step{step:08d}.dcp"
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        torch.save(rng_state(), path / f"rng_r{self.rank}.pt")
        if self.rank == 0:
            save_atomic(train_state, path / "train.pt")
        distributed.barrier()  # every shard is on disk before the pointer moves
        if self.rank == 0:
            tmp = self.dir / f".{self.tag}-latest.dcp.tmp"
            tmp.write_text(path.name + "\n")
            os.replace(tmp, self.dir / f"{self.tag}-latest.dcp")
            self._prune(sorted(self.dir.glob(f"{self.tag}-step*.dcp")), shutil.rmtree)
        distributed.barrier()
        return path

    def _prune(self, paths, remove):
        for old in paths[: -self.keep_last]:
            remove(old)


def _link_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links: copy
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def is_sharded(path: Path) -> bool:
    return resolve(path).is_dir()


def load_sharded(path: Path, model, optimizer, rank: int = 0) -> dict:
    """Load a DCP checkpoint into ``model`` / ``optimizer`` (any world size); returns train.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = resolve(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng_r{rank}.pt"
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))
    return torch.load(path / "train.pt", weights_only=True)


def load_for_resume(manager: CheckpointManager, spec: str | None, model, optimizer, rank: int = 0
                    ) -> tuple[Path, dict] | None:
    """Load the checkpoint ``spec`` (``run.resume``) names into ``model`` / ``optimizer``: ``auto``
    is the run folder's newest readable one (an unreadable, torn latest falls back to the newest
    readable step checkpoint, saying so), a path is that checkpoint, None nothing. Returns (the
    file loaded, its resume state: ``load_training_checkpoint``'s or train.pt's), or None."""
    path = manager.find_latest() if spec == "auto" else (Path(spec) if spec else None)
    if path is None:
        return None
    path = resolve(path)
    if is_sharded(path):
        if not (path / ".metadata").is_file():
            latest = sorted(path.glob("*-latest.pth.tar")) + sorted(path.glob("*-latest.dcp"))
            hint = f"e.g. run.resume={latest[0]}, or --run-dir {path} to continue that run" if latest else \
                "name a checkpoint file"
            raise CheckpointError(f"run.resume={spec}: {path} is a folder, not a checkpoint; {hint}")
        return path, load_sharded(path, model, optimizer, rank)
    fall_back = spec == "auto"
    tried = []
    for cand in [path] + ([p for p in manager.older() if p.resolve() != path.resolve()] if fall_back else []):
        try:
            extra = load_training_checkpoint(cand, model, optimizer)
        except CheckpointUnreadable as e:
            if not fall_back:
                raise
            tried.append(str(e))
            continue
        if tried:
            log.warning(f"{'; '.join(tried)}: resuming from the newest readable checkpoint, {cand}")
        return cand, extra
    raise CheckpointError(f"no readable checkpoint in {manager.dir}: {'; '.join(tried)}; start a new run folder or "
                          f"set run.resume=null to start this one afresh")
