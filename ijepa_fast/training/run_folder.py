"""The run folder: found or created, checked before any work (writable, room for a checkpoint), its
``config.yaml`` written once, each resume's changes recorded, and removed again when a run this
command started fails before it wrote anything worth keeping.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ..errors import RunFolderError
from . import distributed

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


# -- history: a folder that holds a run is continued, never silently restarted or rewound

def _step_of(name: str) -> int | None:
    m = re.search(r"-step(\d+)\.(pth\.tar|dcp)$", name)
    return int(m.group(1)) if m else None


def held_run(run_dir: Path) -> dict | None:
    """What a run folder holds of an earlier run: {"tags": checkpoint tags, "step": its newest step
    (from the checkpoint names, else the metric rows)}, or None when it holds none."""
    from ..runlog.output import read_metrics

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    ckpts = [p for p in run_dir.iterdir() if re.search(r"-(latest|step\d+|ep\d+)\.(pth\.tar|dcp)$", p.name)]
    tags = sorted({re.sub(r"-(latest|step\d+|ep\d+)\.(pth\.tar|dcp)$", "", p.name) for p in ckpts})
    steps = [s for s in (_step_of(p.name) for p in ckpts) if s is not None]
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not tags and not rows:
        return None
    step = max(steps) if steps else max((r.get("step", 0) for r in rows), default=0)
    return {"tags": tags, "step": step}


def check_history(run_dir: Path, tag: str, resume: str | None, loaded: Path | None, step: int,
                  force: bool) -> str | None:
    """Whether this start keeps the run folder's history: None (a new folder, or the run continued),
    "move" (start over: the old files go to ``previous-<time>/``) or "rewind" (continue from an older
    checkpoint of the same run). The last two need ``force``; without it a RunFolderError says how out."""
    held = held_run(run_dir)
    if held is None:
        return None
    way_out = (f"pass --force to start over (the old files are moved to {run_dir}/previous-<time>/, nothing is "
               f"deleted) or give a new --run-dir")
    if loaded is None:
        if force:
            return "move"
        if resume is None:
            why = "run.resume=null would start it over"
        elif tag not in held["tags"]:
            why = (f"it has no checkpoint tagged {tag!r} (its checkpoints are tagged "
                   f"{', '.join(map(repr, held['tags'])) or 'nothing'}), so run.tag={tag} would start it over")
        else:
            why = "this would start it over"
        raise RunFolderError(f"the run folder {run_dir} already holds a run (at step {held['step']}): {why}; {way_out}")
    inside = Path(loaded).resolve().parent == Path(run_dir).resolve()
    if not inside:
        if force:
            return "move"
        raise RunFolderError(f"the run folder {run_dir} already holds a run (at step {held['step']}): continuing "
                             f"{loaded} there would mix two runs; {way_out}")
    if step < held["step"]:
        if force:
            return "rewind"
        raise RunFolderError(f"{loaded} is at step {step} but the run in {run_dir} is at step {held['step']}: "
                             f"rewinding needs --force (the metric rows past step {step} are kept in a side file), "
                             f"or give a new --run-dir")
    return None


def move_aside(run_dir: Path, after_step: int | None = None) -> Path:
    """Move every file of the run folder (but the lock and earlier ``previous-*`` folders) into
    ``previous-<time>/``, or with ``after_step`` only the step checkpoints past that step (a rewind);
    returns that folder."""
    from .run_lock import LOCK

    run_dir = Path(run_dir)
    dest = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 0
    while dest.exists():
        n += 1
        dest = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    dest.mkdir()
    for p in sorted(run_dir.iterdir()):
        if p.name == LOCK or p.name.startswith("previous-") or p == dest:
            continue
        if after_step is not None and (_step_of(p.name) is None or _step_of(p.name) <= after_step):
            continue
        os.replace(p, dest / p.name)
    return dest


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
