"""The checkpoint format, written and read here only: the published layout, atomic writes, strict
loading, the architecture read off the weights, safetensors export.

A checkpoint is a ``.pth.tar`` dict with the published keys ``encoder``, ``predictor``,
``target_encoder`` (state dicts whose keys start with ``module.``), ``opt``, ``scaler``,
``epoch``, ``loss``, ``batch_size``, ``world_size`` and ``lr``, so published checkpoints and
ours load the same way. Ours add an ``ijepa_fast`` entry with what an exact resume needs (step,
sampler, RNG states, data position, config). A sharded (FSDP) checkpoint is a DCP folder
``<tag>-step<N>.dcp/`` named by a ``<tag>-latest.dcp`` pointer file; ``read_checkpoint``
consolidates it into the same dict. A Lightning checkpoint (``.ckpt``) of
``ijepa_fast.lightning.IJEPAModule`` is read into it too (``from_lightning``), so every command
and entry point that takes a checkpoint takes one.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint from elsewhere can hold
tensors and plain containers, never objects that run code when unpickled.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError, CheckpointUnreadable
from ..models import VIT_SIZES, VisionTransformer, VisionTransformerPredictor
from ..models.pos_embed import grid_from_tokens
from ..runlog.output import log

MODULES = ("encoder", "predictor", "target_encoder")
PREFIX = "module."


def strip_prefix(state: dict) -> dict:
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def add_prefix(state: dict) -> dict:
    return {PREFIX + k: v for k, v in state.items()}


def load_strict(module: torch.nn.Module, state: dict, what: str = "model") -> None:
    """load_state_dict(strict) with an error that lists missing, unexpected and mis-shaped keys."""
    state = strip_prefix(state)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes)}")
        raise CheckpointError(f"{what} does not match the checkpoint: " + " | ".join(parts))
    module.load_state_dict(state, strict=True)


def _load(path: Path):
    """torch.load of tensors and plain containers only (see the module docstring)."""
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointUnreadable(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except IsADirectoryError:
        raise CheckpointUnreadable(f"cannot read checkpoint {path}: it is a folder; name a checkpoint file in it "
                                   f"(e.g. {path}/jepa-latest.pth.tar)") from None
    except Exception as e:  # a torn, foreign or unsafe file: say which
        raise CheckpointUnreadable(f"cannot read checkpoint {path}: {_load_failure(e)}") from None


def _load_failure(e: Exception) -> str:
    """Why torch.load failed, in our words (never torch's advice to unpickle an untrusted file)."""
    text = str(e)
    if "Weights only load failed" in text or "weights_only" in text:
        return ("it holds Python objects besides tensors and plain containers, which are never unpickled here "
                "(not a checkpoint of weights)")
    if "invalid load key" in text or "zip archive" in text or "PytorchStreamReader" in text or "pickle" in text:
        return "not a checkpoint file (torn, or another format)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def read_checkpoint(path) -> dict:
    """A checkpoint as one dict in the published layout (a sharded one is consolidated first)."""
    path = resolve(path)
    if path.is_dir():
        return consolidate(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    ckpt = _load(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) and not any(m in ckpt for m in MODULES):
        ckpt = from_lightning(ckpt, path)
    if not isinstance(ckpt, dict) or not any(m in ckpt for m in MODULES):
        raise CheckpointUnreadable(f"{path} is not an I-JEPA checkpoint (no encoder / target_encoder entry)")
    return ckpt


def from_lightning(ckpt: dict, path) -> dict:
    """A Lightning checkpoint of a module holding an IJEPA (``IJEPAModule``: keys ``model.encoder.*``,
    ``model.predictor.*``, ``model.target_encoder.*``) in the published layout: the three state
    dicts, its single optimiser's state as ``opt``, ``epoch``, its RNG states and head counts. It carries no step
    of ours, so ``run.resume`` treats it as a published checkpoint (at the start of its epoch)."""
    state = ckpt["state_dict"]
    prefix = next((k[: -len("encoder.pos_embed")] for k in state if k.endswith("encoder.pos_embed")
                   and not k.endswith("target_encoder.pos_embed")), None)
    if prefix is None:
        raise CheckpointUnreadable(f"{path} is a Lightning checkpoint without an I-JEPA encoder (no "
                                   f"'<module>.encoder.pos_embed' in its state_dict)")
    out = {name: add_prefix({k[len(prefix) + len(name) + 1:]: v for k, v in state.items()
                             if k.startswith(f"{prefix}{name}.")}) for name in MODULES}
    out = {name: sd for name, sd in out.items() if sd}
    optimizers = ckpt.get("optimizer_states") or []
    ours = ckpt.get("ijepa_fast") or {}  # IJEPAModule.on_save_checkpoint's: RNG states and head counts
    out.update({"opt": optimizers[0] if len(optimizers) == 1 else None, "scaler": None,
                "epoch": int(ckpt.get("epoch", 0)), "lightning": {"global_step": int(ckpt.get("global_step", 0))},
                "ijepa_fast": {k: ours[k] for k in ("rng", "num_heads", "pred_heads") if ours.get(k) is not None}})
    return out


def resolve(path) -> Path:
    """A ``<tag>-latest.dcp`` pointer file -> the sharded checkpoint folder it names; anything else unchanged."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".dcp"):
        return path.parent / path.read_text().strip()
    return path


def consolidate(path) -> dict:
    """A sharded (DCP) checkpoint as one published-layout dict (for export, evaluation, a resume
    on one process); the consolidated copy is cached inside the folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = resolve(path)
    if not (path / "train.pt").is_file():
        raise CheckpointError(f"{path} is not a sharded I-JEPA checkpoint (no train.pt)")
    tmp = path / ".consolidated.pt"
    if not tmp.exists():
        dcp_to_torch_save(str(path), str(tmp))
    model = _load(tmp)["model"]
    out = {name: add_prefix({k[len(name) + 1:]: v for k, v in model.items() if k.startswith(name + ".")})
           for name in MODULES}
    extra = _load(path / "train.pt")
    out.update({"opt": None, "scaler": None, "epoch": extra.get("data", {}).get("epoch", 0), "ijepa_fast": extra})
    log.info(f"consolidated the sharded checkpoint {path}")
    return out


def training_checkpoint(model, optimizer, *, epoch: int, loss: float, batch_size: int, world_size: int,
                        lr: float, extra: dict) -> dict:
    """The published-layout dict of a training state (``model``: an IJEPA), with our ``extra``
    resume state (step, sampler, data position, config) and the RNG states under ``ijepa_fast``."""
    state = {name: add_prefix(getattr(model, name).state_dict()) for name in MODULES}
    state.update({"opt": optimizer.state_dict(), "scaler": None, "epoch": epoch, "loss": loss,
                  "batch_size": batch_size, "world_size": world_size, "lr": lr,
                  "ijepa_fast": {**extra, "rng": rng_state()}})
    return state


def load_training_checkpoint(path, model, optimizer) -> dict:
    """Load a one-file checkpoint (ours or a published one) into ``model`` (an IJEPA) and
    ``optimizer``, and restore the RNG states it carries. Returns its ``ijepa_fast`` entry (empty
    for a published file) plus its ``epoch``."""
    ckpt = read_checkpoint(path)
    for name in MODULES:
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


def write_error(path, e: BaseException) -> Exception:
    """The one-line error for a failed write of ``path``: a full disk or an I/O error is the
    machine's (MachineError), anything else (read-only, no permission) the user's to fix."""
    import errno

    from ..errors import MachineError

    old = " (the previous file is intact)" if Path(path).exists() else ""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)) or (
            isinstance(e, RuntimeError) and ("enforce fail" in text or "file write failed" in text)):
        return MachineError(f"could not write {path}: the disk is full; free some space and run again{old}")
    if code == errno.EIO:
        return MachineError(f"could not write {path}: an input/output error of the disk{old}")
    why = e.strerror if isinstance(e, OSError) and e.strerror else text
    return CheckpointError(f"could not write {path}: {why}; choose a writable place{old}")


def write_atomic(path, write) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, fsync, the usual permissions (0666 less
    the umask), then rename over ``path``: a kill or a full disk at any moment leaves either the old
    file or the new one, never a torn one. A failed write raises CheckpointError saying why
    (MachineError for a full disk or an I/O error)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise write_error(path, e) from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def save_atomic(obj, path) -> None:
    """torch.save ``obj`` to ``path`` atomically (see ``write_atomic``)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------------------------------
# architecture from weights

def encoder_spec(state: dict, num_heads: int | None = None) -> dict:
    """VisionTransformer arguments read off an encoder state dict (square grid assumed).

    The head count is not in the weights: it comes from the standard size with the same width
    and depth, or must be given.
    """
    state = strip_prefix(state)
    try:
        _, n, dim = state["pos_embed"].shape
        patch = state["patch_embed.proj.weight"].shape[-1]
        in_chans = state["patch_embed.proj.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"not a ViT encoder state dict: no {e.args[0]!r}") from None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * dim
    if num_heads is None:
        match = [s for s in VIT_SIZES.values() if s.dim == dim and s.depth == depth]
        if not match:
            raise CheckpointError(f"width {dim} / depth {depth} is not a standard ViT size, so the head count is not "
                                  f"known: give it (--num-heads N on the command line, num_heads=N in Python)")
        num_heads = match[0].heads
    grid = grid_from_tokens(n)
    return dict(img_size=(grid[0] * patch, grid[1] * patch), patch_size=patch, in_chans=in_chans, embed_dim=dim,
                depth=depth, num_heads=num_heads, mlp_ratio=_ratio(hidden, dim),
                qkv_bias="blocks.0.attn.qkv.bias" in state)


def _ratio(hidden: int, dim: int) -> float:
    """An MLP ratio r with int(dim * r) == hidden (the blocks size their MLP that way)."""
    r = hidden / dim
    return r if int(dim * r) == hidden else (hidden + 0.5) / dim


def predictor_spec(state: dict, num_heads: int) -> dict:
    state = strip_prefix(state)
    _, n, pdim = state["predictor_pos_embed"].shape
    depth = len({k.split(".")[1] for k in state if k.startswith("predictor_blocks.")})
    hidden = state["predictor_blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * pdim
    return dict(grid=grid_from_tokens(n), embed_dim=state["predictor_proj.weight"].shape[0], predictor_embed_dim=pdim,
                depth=depth, num_heads=num_heads, mlp_ratio=_ratio(hidden, pdim),
                qkv_bias="predictor_blocks.0.attn.qkv.bias" in state)


def encoder_from_checkpoint(path_or_ckpt, which: str = "target_encoder", num_heads: int | None = None,
                            **kw) -> VisionTransformer:
    """An encoder built from a checkpoint's weights (``which``: target_encoder or encoder)."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else read_checkpoint(path_or_ckpt)
    if which not in ("target_encoder", "encoder"):
        raise ValueError(f"which must be 'target_encoder' or 'encoder', got {which!r}")
    if which not in ckpt:
        raise CheckpointError(f"the checkpoint has no {which!r} entry (it has {sorted(ckpt)})")
    if num_heads is None:
        num_heads = (ckpt.get("ijepa_fast") or {}).get("num_heads")  # ours record it; published ones are standard
    enc = VisionTransformer(**encoder_spec(ckpt[which], num_heads), **kw)
    load_strict(enc, ckpt[which], which)
    return enc


def models_from_checkpoint(path_or_ckpt, num_heads: int | None = None, pred_heads: int | None = None, **kw):
    """(encoder, predictor, target_encoder) built from and loaded with a checkpoint's weights."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else read_checkpoint(path_or_ckpt)
    enc = encoder_from_checkpoint(ckpt, "encoder", num_heads, **kw)
    tgt = encoder_from_checkpoint(ckpt, "target_encoder", enc.num_heads, **kw)
    pred_heads = pred_heads or (ckpt.get("ijepa_fast") or {}).get("pred_heads") or enc.num_heads
    pred = VisionTransformerPredictor(**predictor_spec(ckpt["predictor"], pred_heads), **kw)
    load_strict(pred, ckpt["predictor"], "predictor")
    return enc, pred, tgt


# ---------------------------------------------------------------------------------------------
# training state

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _py_state_to_list(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_py_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_list(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_list(s):
    return (s[0], tuple(s[1]), s[2])


def export_safetensors(src, out, which: str = "target_encoder", num_heads: int | None = None) -> Path:
    """Write one encoder of a checkpoint as safetensors (plain keys; architecture in the metadata)."""
    from safetensors.torch import save_file

    ckpt = read_checkpoint(src)
    if which not in ckpt:
        raise CheckpointError(f"the checkpoint has no {which!r} entry")
    state = {k: v.contiguous() for k, v in strip_prefix(ckpt[which]).items()}
    spec = encoder_spec(state, num_heads=num_heads or (ckpt.get("ijepa_fast") or {}).get("num_heads"))
    meta = {k: str(v) for k, v in spec.items()}
    meta["which"] = which
    return write_atomic(out, lambda tmp: save_file(state, tmp, metadata=meta))
