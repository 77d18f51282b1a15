"""The engine's own state entries, beside the published checkpoint layout (``format``), built and read here only:

- ``Engine.state_dict()``: weights, optimiser, sampler, next step and RNG states, versioned
  (``engine_state`` / ``load_engine_state``);
- the ``ijepa_fast`` entry of a run checkpoint: what an exact resume needs besides weights and optimiser
  (``resume_entry`` / ``read_resume_entry``);
- what ``IJEPAModule`` adds to a Lightning checkpoint: RNG states, the masks' seed and mode, the head counts
  (``lightning_entry`` / ``read_lightning_entry``; ``format.from_lightning`` reads the same entry).
The trainer, the Engine and the Lightning module pass values; the keys are written once, below.
Every entry is tensors and plain containers (it loads with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .format import rng_state, set_rng_state

ENGINE_STATE_VERSION = 1
ENTRY = "ijepa_fast"  # the key of our entry in a run checkpoint and in a Lightning checkpoint


def head_counts(model) -> dict:
    """The encoder's and the predictor's attention head counts of an IJEPA: not in the weights' shapes, so
    recorded beside them for readers that rebuild the networks (``format.encoder_from_checkpoint``)."""
    blocks = model.predictor.predictor_blocks
    return {"num_heads": model.encoder.num_heads, "pred_heads": blocks[0].attn.num_heads if len(blocks) else None}


# -- Engine.state_dict()
def engine_state(*, model_state: dict, optimizer_state: dict, sampler_state: dict, next_step: int) -> dict:
    return {"version": ENGINE_STATE_VERSION, "model": model_state, "optimizer": optimizer_state,
            "sampler": sampler_state, "next_step": int(next_step), "rng": rng_state()}


def load_engine_state(state: dict, *, model, optimizer, sampler, strict: bool = True) -> int:
    """Restores ``engine_state``'s output into the given objects and the RNGs; returns the next step."""
    if not isinstance(state, dict) or state.get("version") != ENGINE_STATE_VERSION:
        found = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not an Engine state (version {found!r}, expected {ENGINE_STATE_VERSION})")
    model.load_state_dict(state["model"], strict=strict)
    optimizer.load_state_dict(state["optimizer"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    return int(state["next_step"])


# -- the resume entry of a run checkpoint
@dataclass
class ResumePoint:
    """Where a loaded checkpoint puts the run: the step to train next, the sampler's state (None for a
    published checkpoint, whose masks restart at that step), the global batch it was trained with (None
    if unknown) and its settings ({} for a published checkpoint)."""

    step: int
    sampler: dict | None
    global_batch: int | None
    config: dict


def resume_entry(*, version: str, step: int, steps_per_epoch: int, sampler_state: dict, global_batch: int,
                 heads: dict, config: dict) -> dict:
    return {"version": version, "step": int(step), "sampler": sampler_state,
            "data": {"epoch": step // steps_per_epoch, "batch": step % steps_per_epoch},
            "global_batch": global_batch, **heads, "config": config}


def read_resume_entry(extra: dict, steps_per_epoch: int) -> ResumePoint:
    """``extra``: ``format.load_training_checkpoint``'s entry (ours, or the epoch of a published checkpoint,
    which the reference resumes at the start of: epoch x iterations per epoch)."""
    if "step" in extra:
        return ResumePoint(int(extra["step"]), extra["sampler"], extra.get("global_batch"),
                           dict(extra.get("config") or {}))
    return ResumePoint(int(extra["epoch"]) * steps_per_epoch, None, None, {})


# -- what IJEPAModule adds to a Lightning checkpoint
def lightning_entry(*, seed: int, mode: str, heads: dict) -> dict:
    return {"rng": rng_state(), "sampler": {"seed": seed, "mode": mode}, **heads}


def read_lightning_entry(checkpoint: dict, *, seed: int, mode: str) -> None:
    """Checks the checkpoint's masks were drawn as this module draws them and restores the RNG states."""
    extra = checkpoint.get(ENTRY) or {}
    saved = extra.get("sampler", {})
    if saved and (saved.get("seed"), saved.get("mode")) != (seed, mode):
        raise ConfigError(f"the checkpoint's masks used seed={saved.get('seed')} mode={saved.get('mode')!r}, "
                          f"this module seed={seed} mode={mode!r}")
    if extra.get("rng"):
        set_rng_state(extra["rng"])
