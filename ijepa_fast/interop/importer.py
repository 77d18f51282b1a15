"""Import a timm or Hugging Face transformers I-JEPA encoder into our checkpoint layout.

The written file is a published-layout checkpoint: ``encoder`` and ``target_encoder`` hold the
imported weights, ``predictor`` is a fresh predictor initialised as a new run's (seeded), ``opt``
is None and ``epoch`` 0; its ``ijepa_fast`` entry records the head counts and where the weights
came from. See ``interop`` for the formats.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint.format import add_prefix, encoder_spec, load_strict, save_atomic
from ..errors import CheckpointError, ConfigError
from ..models import VIT_SIZES, VisionTransformer, build_predictor
from ..models.layers import reinit_linear_and_norm
from ..runlog.output import log
from .export import TIMM_IJEPA, from_hf

IMPORT_FORMATS = ("auto", "timm", "hf")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "model.pth")


def detect_format(src) -> str:
    """'hf' for a folder whose config.json says model_type ijepa, else 'timm'."""
    cfg = Path(src) / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "ijepa":
        return "hf"
    return "timm"


def read_weights(path) -> dict:
    """A state dict from a .safetensors file or a torch file (tensors only), sharded index included."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"cannot read the shard index {path} ({type(e).__name__}: {e})") from None
        return {k: v for s in shards for k, v in read_weights(path.parent / s).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # torn, empty or not safetensors at all
            why = " ".join(str(e).split())[:200] or type(e).__name__
            raise CheckpointError(f"cannot read {path}: not a safetensors file ({why})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(state, dict) and any(k in state for k in ("encoder", "target_encoder")):
        raise CheckpointError(f"{path} is already an I-JEPA checkpoint (it has an encoder entry): use it as it is")
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            return state[key]
    return state


def _folder(src) -> tuple[dict, dict]:
    """(weights, config.json or {}) of a file or a folder."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if src.is_file():
        return read_weights(src), {}
    cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else {}
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json", *WEIGHT_FILES):
        if (src / name).is_file():
            return read_weights(src / name), cfg
    raise CheckpointError(f"{src} holds no weights ({', '.join(WEIGHT_FILES)})")


def read_encoder(src, *, format: str = "auto", num_heads: int | None = None) -> tuple[dict, dict]:
    """(our encoder state dict, VisionTransformer arguments) of a timm or transformers source."""
    if format not in IMPORT_FORMATS:
        raise ConfigError(f"format: choose one of {IMPORT_FORMATS}, got {format!r}")
    if format == "auto":
        format = detect_format(src) if Path(src).is_dir() else "timm"
    state, cfg = _folder(src)
    if format == "hf":
        if cfg.get("model_type") not in (None, "ijepa"):
            raise CheckpointError(f"{src} is a {cfg['model_type']!r} model, not an I-JEPA (ijepa) one")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{src}: hidden_act {cfg['hidden_act']!r}; our encoder uses exact GELU ('gelu')")
        eps = cfg.get("layer_norm_eps", 1e-12)
        if abs(eps - 1e-6) > 1e-12:
            log.warning(f"{src}: layer_norm_eps {eps:g}; our encoder uses 1e-6, so features differ slightly")
        num_heads = num_heads or cfg.get("num_attention_heads")
        state = from_hf(state)
    else:
        args = cfg.get("model_args") or {}
        if any(k in state for k in ("cls_token", "reg_token")) or args.get("class_token"):
            raise CheckpointError(f"{src} is a ViT with a class token: I-JEPA encoders have none "
                                  f"(timm builds them with class_token=False, global_pool='avg')")
        head = sorted(k for k in state if k.startswith("head."))
        if head:
            log.info(f"not imported (a classifier, not part of the encoder): {', '.join(head)}")
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        if num_heads is None:
            num_heads = args.get("num_heads")
        if num_heads is None and cfg.get("architecture") in TIMM_IJEPA.values():
            num_heads = 16
    state = {k: v.float().contiguous() for k, v in state.items()}
    return state, encoder_spec(state, num_heads=num_heads)


def import_encoder(src, out, *, format: str = "auto", num_heads: int | None = None, pred_depth: int = 12,
                   pred_dim: int = 384, pred_heads: int | None = None, seed: int = 0) -> tuple[Path, str]:
    """Write ``src`` (a timm / transformers encoder) as a checkpoint ``out`` in our layout (see the
    module docstring). The predictor has ``pred_depth`` blocks of width ``pred_dim`` (the training
    config's model.pred_depth / model.pred_dim / model.pred_heads must match to continue training).
    Returns (the path, a message with the training overrides that fit it)."""
    state, spec = read_encoder(src, format=format, num_heads=num_heads)
    enc = VisionTransformer(**spec)
    load_strict(enc, state, f"an encoder built from {src}")
    heads = pred_heads or spec["num_heads"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pred = build_predictor(enc.grid, enc.embed_dim, heads, pred_dim, pred_depth)
        reinit_linear_and_norm(pred)  # the released training script's init (model.init=released)
    weights = add_prefix(enc.state_dict())
    ckpt = {"encoder": weights, "predictor": add_prefix(pred.state_dict()),
            "target_encoder": {k: v.clone() for k, v in weights.items()}, "opt": None, "scaler": None, "epoch": 0,
            "loss": None, "batch_size": None, "world_size": None, "lr": None,
            "ijepa_fast": {"num_heads": spec["num_heads"], "pred_heads": heads,
                           "imported": {"source": str(src), "format": format, "predictor": "fresh", "seed": seed}}}
    save_atomic(ckpt, out)
    overrides = training_overrides(spec) + [f"model.pred_depth={pred_depth}", f"model.pred_dim={pred_dim}"]
    if pred_heads:
        overrides.append(f"model.pred_heads={pred_heads}")
    return Path(out), (f"wrote {src} as {out}: encoder and target encoder = the imported weights, a fresh predictor "
                       f"({pred_depth} x {pred_dim}); continue pretraining with run.resume={out} "
                       + " ".join(overrides))


def training_overrides(spec: dict) -> list[str]:
    """The model / data settings of a training config whose encoder has these weights' shape."""
    h, _ = spec["img_size"]
    out = [f"model.patch_size={spec['patch_size']}", f"data.crop_size={h}"]
    for name, s in VIT_SIZES.items():
        if (s.dim, s.depth, s.heads, int(s.dim * s.mlp_ratio)) == (
                spec["embed_dim"], spec["depth"], spec["num_heads"], int(spec["embed_dim"] * spec["mlp_ratio"])):
            return [f"model.name={name}"] + out
    return ["model.name=custom", f"model.embed_dim={spec['embed_dim']}", f"model.depth={spec['depth']}",
            f"model.num_heads={spec['num_heads']}", f"model.mlp_ratio={spec['mlp_ratio']!r}"] + out
