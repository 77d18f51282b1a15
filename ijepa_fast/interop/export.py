"""Export an encoder to timm's and Hugging Face transformers' layouts, and import theirs back.

``export_encoder(checkpoint, out, format=...)`` writes one encoder of a checkpoint:

- ``safetensors``: one file, our (timm's) key names, the architecture in its metadata;
- ``timm``: a folder ``config.json`` + ``model.safetensors`` in timm's own layout (the keys of
  timm's ``VisionTransformer`` with ``class_token=False, global_pool='avg', fc_norm=False``,
  which is how timm registers the I-JEPA encoders); ``timm.create_model('local-dir:OUT')``
  (timm 1.0.16+) or ``timm.create_model(cfg['architecture'], pretrained=True,
  pretrained_cfg_overlay=dict(file='OUT/model.safetensors'), **cfg['model_args'])`` loads it;
- ``hf``: a folder ``config.json`` + ``model.safetensors`` + ``preprocessor_config.json`` that
  ``transformers.IJepaModel.from_pretrained(OUT)`` loads (``attn.qkv`` split into query, key and
  value; the key names every transformers release that has I-JEPA reads).

Both public conversions of the released checkpoints take the CONTEXT encoder (``encoder``); the
paper evaluates, and we export by default, the EMA TARGET encoder (``target_encoder``):
``which`` chooses, and the choice is written into the metadata and the message.

``import_encoder(src, out, format=...)`` turns a timm state dict / export folder or a Hugging
Face I-JEPA folder into our checkpoint layout: ``encoder`` and ``target_encoder`` both hold the
imported weights, the ``predictor`` is freshly initialised (as a new run would be), no optimiser
state, epoch 0. ``encoder_from_checkpoint``, ``extract`` and ``probe`` read it, and training
continues from it with ``run.resume=OUT`` (a published-layout file: the run starts at step 0).

Neither timm nor transformers is needed to export or import: the files are written and read here.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint.format import (
    encoder_spec,
    export_safetensors,
    read_checkpoint,
    strip_prefix,
    write_atomic,
    write_error,
)
from ..errors import CheckpointError, ConfigError, MachineError
from ..runlog.output import log

FORMATS = ("safetensors", "timm", "hf")
WHICH = {"target": "target_encoder", "target_encoder": "target_encoder", "encoder": "encoder",
         "context": "encoder"}
DESCRIBE = {"target_encoder": "the target encoder (EMA weights, checkpoint entry 'target_encoder')",
            "encoder": "the context encoder (checkpoint entry 'encoder')"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# timm's registered I-JEPA encoders: (width, depth, patch, image side) -> architecture
TIMM_IJEPA = {(1280, 32, 14, 224): "vit_huge_patch14_gap_224", (1280, 32, 16, 448): "vit_huge_patch16_gap_448",
              (1408, 40, 16, 224): "vit_giant_patch16_gap_224"}
TIMM_GENERIC = "vit_base_patch16_gap_224"  # any other size: the same class, every argument in model_args


def which_entry(which: str) -> str:
    """'target' / 'target_encoder' -> 'target_encoder'; 'encoder' / 'context' -> 'encoder'."""
    if which not in WHICH:
        raise ConfigError(f"which: choose 'target' (the EMA target encoder) or 'encoder' (the context encoder), "
                          f"got {which!r}")
    return WHICH[which]


# ---------------------------------------------------------------------------------------------
# export

def export_encoder(src, out, *, format: str = "safetensors", which: str = "target",
                   num_heads: int | None = None) -> tuple[Path, str]:
    """Write one encoder of the checkpoint ``src`` to ``out`` in ``format`` (see the module
    docstring). Returns (the path written, a one-line description naming the encoder)."""
    entry = which_entry(which)
    if format not in FORMATS:
        raise ConfigError(f"format: choose one of {FORMATS}, got {format!r}")
    if format == "safetensors":
        path = export_safetensors(src, out, entry, num_heads=num_heads)
        return path, f"wrote {DESCRIBE[entry]} of {src} to {path} (safetensors)"
    ckpt = read_checkpoint(src)
    if entry not in ckpt:
        raise CheckpointError(f"the checkpoint has no {entry!r} entry (it has {sorted(ckpt)})")
    state = {k: v.detach().float().contiguous() for k, v in strip_prefix(ckpt[entry]).items()}
    extra = ckpt.get("ijepa_fast") or {}
    spec = encoder_spec(state, num_heads=num_heads or extra.get("num_heads"))
    data = (extra.get("config") or {}).get("data") or {}
    mean, std = tuple(data.get("mean", IMAGENET_MEAN)), tuple(data.get("std", IMAGENET_STD))
    prov = {"which": entry, "source": str(src), "ijepa_fast_version": __version__}
    if format == "timm":
        files = {"model.safetensors": (state, {"format": "pt", "which": entry}),
                 "config.json": timm_config(spec, mean, std, prov)}
    else:
        files = {"model.safetensors": (to_hf(state), {"format": "pt", "which": entry}),
                 "config.json": hf_config(spec, prov),
                 "preprocessor_config.json": hf_preprocessor(spec, mean, std)}
    path = write_folder(out, files)
    return path, f"wrote {DESCRIBE[entry]} of {src} to {path}/ ({format} layout)"


def write_folder(out, files: dict) -> Path:
    """Write ``files`` (name -> JSON-able dict, or (tensors, metadata) for safetensors) as the folder
    ``out``: everything is written and synced in a temporary folder beside it first; a new ``out``
    then appears by one rename, an existing one has each file replaced by a rename (never torn)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file: the timm and hf formats write a folder")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        for name, content in files.items():
            if isinstance(content, tuple):
                tensors, meta = content
                write_atomic(tmp / name, lambda t, s=tensors, m=meta: save_file(s, t, metadata=m))
            else:
                text = json.dumps(content, indent=2) + "\n"
                write_atomic(tmp / name, lambda t, s=text: Path(t).write_text(s))
        if not out.exists():
            os.chmod(tmp, 0o777 & ~_umask())
            os.replace(tmp, out)
        else:
            for name in files:
                os.replace(tmp / name, out / name)
    except (CheckpointError, MachineError):
        raise
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _model_args(spec: dict) -> dict:
    h, w = spec["img_size"]
    return dict(img_size=[h, w] if h != w else h, patch_size=spec["patch_size"], in_chans=spec["in_chans"],
                embed_dim=spec["embed_dim"], depth=spec["depth"], num_heads=spec["num_heads"],
                mlp_ratio=spec["mlp_ratio"], qkv_bias=spec["qkv_bias"], class_token=False, global_pool="avg",
                fc_norm=False, num_classes=0)


def timm_config(spec: dict, mean, std, prov: dict) -> dict:
    """timm's config.json: architecture, every constructor argument, the preprocessing."""
    h, w = spec["img_size"]
    key = (spec["embed_dim"], spec["depth"], spec["patch_size"], h)
    arch = TIMM_IJEPA.get(key, TIMM_GENERIC) if h == w else TIMM_GENERIC
    return {"architecture": arch, "num_classes": 0, "num_features": spec["embed_dim"], "global_pool": "avg",
            "model_args": _model_args(spec),
            "pretrained_cfg": {"tag": "ijepa_fast", "custom_load": False, "input_size": [spec["in_chans"], h, w],
                               "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 0.875,
                               "crop_mode": "center", "mean": list(mean), "std": list(std), "num_classes": 0,
                               "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head"},
            "ijepa_fast": prov}


def hf_config(spec: dict, prov: dict) -> dict:
    """transformers' IJepaConfig as JSON (no pooler; the final layer norm is ``layernorm``)."""
    h, w = spec["img_size"]
    if h != w:
        raise CheckpointError(f"transformers' IJepaModel needs a square image, this encoder is {h}x{w}")
    dim = spec["embed_dim"]
    return {"architectures": ["IJepaModel"], "model_type": "ijepa", "hidden_size": dim,
            "num_hidden_layers": spec["depth"], "num_attention_heads": spec["num_heads"],
            "intermediate_size": int(dim * spec["mlp_ratio"]), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": 1e-6,
            "image_size": h, "patch_size": spec["patch_size"], "num_channels": spec["in_chans"],
            "qkv_bias": spec["qkv_bias"], "pooler_output_size": dim, "pooler_act": "tanh", "dtype": "float32",
            "ijepa_fast": prov}


def hf_preprocessor(spec: dict, mean, std) -> dict:
    """A ViTImageProcessor (resize to the native resolution, rescale, normalise), as the public
    I-JEPA folders use; our ``extract`` resizes to 256/224 of it and centre-crops instead."""
    h, w = spec["img_size"]
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
            "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(mean), "image_std": list(std)}


# ours -> transformers' saved names (per block; the qkv projection is split in three)
_HF_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
_HF_TOP = {"patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"}
# the names transformers 5 uses in memory -> the saved ones (both are accepted on import)
_HF_RUNTIME = (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
               ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
               ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"))


def to_hf(state: dict) -> dict:
    """Our encoder state dict -> transformers' IJepaModel keys."""
    out = {}
    for k, v in state.items():
        if k == "pos_embed":
            out["embeddings.position_embeddings"] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            mod, param = rest.rsplit(".", 1)
            pre = f"encoder.layer.{i}."
            if mod == "attn.qkv":
                for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                    out[f"{pre}attention.attention.{name}.{param}"] = part.contiguous()
            elif mod in _HF_BLOCK:
                out[f"{pre}{_HF_BLOCK[mod]}.{param}"] = v
            else:
                raise CheckpointError(f"no transformers name for {k!r}")
        else:
            mod, param = k.rsplit(".", 1)
            if mod not in _HF_TOP:
                raise CheckpointError(f"no transformers name for {k!r}")
            out[f"{_HF_TOP[mod]}.{param}"] = v
    return out


def from_hf(state: dict) -> dict:
    """transformers' IJepaModel keys (saved or in-memory names; an ``ijepa.`` prefix, the pooler,
    the mask token and a classifier are dropped) -> our encoder state dict."""
    state = {(k[len("ijepa."):] if k.startswith("ijepa.") else k): v for k, v in state.items()}
    dropped = sorted(k for k in state if k.split(".")[0] in ("pooler", "classifier") or k == "embeddings.mask_token")
    if dropped:
        log.info(f"not imported (not part of the encoder): {', '.join(dropped)}")
    top = {v: k for k, v in _HF_TOP.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    out, qkv, unknown = {}, {}, []
    for k, v in state.items():
        if k in dropped:
            continue
        if k.startswith("layers."):
            k = "encoder.layer." + k[len("layers."):]
            for new, old in _HF_RUNTIME:
                k = k.replace(new, old)
        if k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("encoder.layer."):
            i, rest = k[len("encoder.layer."):].split(".", 1)
            mod, param = rest.rsplit(".", 1)
            if mod.startswith("attention.attention."):
                qkv.setdefault((i, param), {})[mod.rsplit(".", 1)[1]] = v
            elif mod in block:
                out[f"blocks.{i}.{block[mod]}.{param}"] = v
            else:
                unknown.append(k)
        elif k.rsplit(".", 1)[0] in top:
            mod, param = k.rsplit(".", 1)
            out[f"{top[mod]}.{param}"] = v
        else:
            unknown.append(k)
    for (i, param), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise CheckpointError(f"layer {i}: the attention {param} needs query, key and value, found {sorted(parts)}")
        out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    if unknown:
        raise CheckpointError(f"not an I-JEPA / ViT encoder: unknown keys {', '.join(sorted(unknown)[:8])}")
    return out
