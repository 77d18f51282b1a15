"""Saving and restoring the whole training state: one file, or sharded (FSDP) with DCP.

One file (single process, DDP): ``<tag>-step<N>.pth.tar`` in the published layout (see
``checkpoint``), written atomically by rank 0; ``<tag>-latest.pth.tar`` is a hard link to the
newest, replaced atomically; the newest ``run.keep_last`` step files are kept, and
``<tag>-ep<E>.pth.tar`` every ``run.keep_every_epochs`` epochs.

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

from . import distributed
from .checkpoint import CheckpointError, load_strict, read_checkpoint, rng_state, save_atomic, set_rng_state
from .runlog import log


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


def resolve(path: Path) -> Path:
    """A ``<tag>-latest.dcp`` pointer -> the directory it names; anything else unchanged."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".dcp"):
        return path.parent / path.read_text().strip()
    return path


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


def load_file(path: Path, model, optimizer) -> dict:
    """Load a one-file checkpoint (ours or a published one); returns its ``ijepa_fast`` entry
    (empty for a published file) plus its ``epoch``."""
    ckpt = read_checkpoint(path)
    for name in ("encoder", "predictor", "target_encoder"):
        if name not in ckpt:
            raise CheckpointError(f"{path} has no {name!r} entry; cannot resume from it")
        load_strict(getattr(model, name), ckpt[name], name)
    if ckpt.get("opt") is not None:
        try:
            optimizer.load_state_dict(ckpt["opt"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimiser state does not fit this model ({e})") from None
    extra = dict(ckpt.get("ijepa_fast") or {})
    if extra.get("rng"):
        set_rng_state(extra["rng"])
    extra["epoch"] = int(ckpt.get("epoch", 0))
    return extra


def consolidate(path: Path) -> dict:
    """A sharded checkpoint as one published-layout dict (for export and evaluation)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from .checkpoint import add_prefix

    path = resolve(path)
    tmp = path / ".consolidated.pt"
    if not tmp.exists():
        dcp_to_torch_save(str(path), str(tmp))
    full = torch.load(tmp, weights_only=False)
    model = full["model"]
    out = {name: add_prefix({k[len(name) + 1:]: v for k, v in model.items() if k.startswith(name + ".")})
           for name in ("encoder", "predictor", "target_encoder")}
    extra = torch.load(path / "train.pt", weights_only=True)
    out.update({"opt": None, "scaler": None, "epoch": extra.get("data", {}).get("epoch", 0), "ijepa_fast": extra})
    log.info(f"consolidated the sharded checkpoint {path}")
    return out
