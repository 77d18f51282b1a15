"""The run folder: found or created, checked before any work (writable, room for a checkpoint), its
``config.yaml`` written once, each resume's changes recorded, and removed again when a run this
command started fails before it wrote anything worth keeping.
"""
from __future__ import annotations

import datetime
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import distributed
from .errors import RunFolderError

# settings a resume may change without changing what is trained (how it runs, how long, where)
RUNTIME_KEYS = ("run.max_steps", "run.resume", "run.dir", "run.out_dir", "run.name", "run.progress", "run.plot",
                "run.device", "run.threads", "run.log_every", "run.checkpoint_every", "run.keep_last",
                "run.keep_every_epochs", "data.num_workers", "data.pin_memory", "data.loader", "data.path")


def make_run_dir(cfg, config_name: str) -> tuple[Path, bool]:
    """The run folder (run.dir, or out_dir/<name>, named by rank 0 and shared with every rank),
    created if needed and checked writable. Returns (folder, whether this call created it)."""
    if cfg.run.dir:
        path = Path(cfg.run.dir)
    else:
        name = [cfg.run.name or f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if distributed.active():
            torch.distributed.broadcast_object_list(name, src=0)
        path = Path(cfg.run.out_dir) / name[0]
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunFolderError(f"cannot write to the run folder {path} ({e.strerror or e}); give a writable folder "
                             f"with --run-dir or run.dir") from None
    return path, created


def checkpoint_bytes(model) -> int:
    """About the size of one checkpoint of ``model`` (an IJEPA): fp32 weights of the three
    networks and AdamW's two fp32 moments of every trained parameter."""
    weights = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for part in (model.encoder, model.predictor) for p in part.parameters() if p.requires_grad)
    return 4 * weights + 8 * trained + (1 << 20)


def check_room(path: Path, need: int) -> None:
    """There is room for one more checkpoint (it is written beside the previous one, then renamed)."""
    free = shutil.disk_usage(path).free
    if free < need:
        raise RunFolderError(f"the run folder {path} has {free / 2**20:.1f} MiB free, but a checkpoint of this model "
                             f"needs about {need / 2**20:.1f} MiB; free some space or choose another --run-dir")


def remove_if_created(path: Path, created: bool) -> None:
    """Undo a run folder this command created, when the command fails before training."""
    if created and path.is_dir() and not any(path.glob("*-latest*")):
        shutil.rmtree(path, ignore_errors=True)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def record_config(run_dir: Path, config: dict, *, resumed: bool, before: dict | None, step: int) -> list[str]:
    """Write ``config.yaml`` for a run that starts here. A resumed run keeps it as first written and
    appends what changed since the checkpoint's settings (``before``; lacking those, config.yaml's)
    to ``config_history.yaml``: date, step and [before, now] of every changed key. Returns the keys
    whose change alters what is trained (not only how it runs)."""
    import yaml

    path = run_dir / "config.yaml"
    if not resumed or not path.exists():
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        if not resumed or before is None:
            return []
    old, new = _flat(before if before is not None else (yaml.safe_load(path.read_text()) or {})), _flat(config)
    changes = {k: [old[k], new[k]] for k in new if k in old and old[k] != new[k]}
    if changes:
        entry = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "step": step, "changes": changes}
        with open(run_dir / "config_history.yaml", "a") as f:
            f.write("---\n" + yaml.safe_dump(entry, sort_keys=False))
    return sorted(k for k in changes if k not in RUNTIME_KEYS)


def written_since(run_dir, since: float) -> list[tuple[str, int]]:
    """(path relative to ``run_dir``, bytes) of every file in it modified at or after ``since`` (a
    ``time.time()``), sorted: what a command wrote into its run folder."""
    run_dir = Path(run_dir)
    out = []
    for p in sorted(run_dir.rglob("*")):
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file() and st.st_mtime >= since - 1:  # file-system timestamps can be a second coarse
            out.append((str(p.relative_to(run_dir)), st.st_size))
    return out
