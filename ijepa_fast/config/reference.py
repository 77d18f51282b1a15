"""Reading the reference implementation's YAML files (sections data, mask, meta, optimization, logging).

Each of their keys maps to one of ours; the masks run in ``reference`` mode, since such a file
describes the released code. Options the engine does not implement (color distortion, blur)
are accepted only when switched off; anything else unknown is an error naming the key.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

SECTIONS = {"data", "mask", "meta", "optimization", "logging"}

# reference key -> our dotted key (None: accepted and ignored; see IGNORED_WHEN)
KEYMAP = {
    "data.batch_size": "data.batch_size",
    "data.crop_scale": "data.crop_scale",
    "data.crop_size": "data.crop_size",
    "data.num_workers": "data.num_workers",
    "data.pin_mem": "data.pin_memory",
    "data.use_horizontal_flip": "data.hflip",
    "data.root_path": None,
    "data.image_folder": None,
    "data.color_jitter_strength": None,
    "data.use_color_distortion": None,
    "data.use_gaussian_blur": None,
    "mask.allow_overlap": "mask.allow_overlap",
    "mask.aspect_ratio": "mask.target_aspect",
    "mask.enc_mask_scale": "mask.context_scale",
    "mask.min_keep": "mask.min_keep",
    "mask.num_enc_masks": "mask.num_context",
    "mask.num_pred_masks": "mask.num_targets",
    "mask.patch_size": "model.patch_size",
    "mask.pred_mask_scale": "mask.target_scale",
    "meta.model_name": "model.name",
    "meta.pred_depth": "model.pred_depth",
    "meta.pred_emb_dim": "model.pred_dim",
    "meta.use_bfloat16": None,
    "meta.load_checkpoint": None,
    "meta.read_checkpoint": None,
    "meta.copy_data": None,
    "optimization.ema": "optim.ema",
    "optimization.epochs": "optim.epochs",
    "optimization.final_lr": "optim.final_lr",
    "optimization.final_weight_decay": "optim.final_weight_decay",
    "optimization.ipe_scale": "optim.ipe_scale",
    "optimization.lr": "optim.lr",
    "optimization.start_lr": "optim.start_lr",
    "optimization.warmup": "optim.warmup",
    "optimization.weight_decay": "optim.weight_decay",
    "logging.folder": "run.dir",
    "logging.write_tag": "run.tag",
}

UNSUPPORTED_WHEN_TRUE = {
    "data.use_color_distortion": "color distortion is not implemented (the published recipes leave it off)",
    "data.use_gaussian_blur": "Gaussian blur is not implemented (the published recipes leave it off)",
}


def is_reference_config(data: dict) -> bool:
    return bool(data) and set(data) <= SECTIONS and "meta" in data


def _placeholder(value) -> bool:
    return isinstance(value, str) and value.startswith("$replace_this")


def translate_reference_config(data: dict, path: Path | None = None) -> dict:
    """A reference YAML dict -> our nested dict."""
    where = f"{path}: " if path else ""
    out: dict = {"mask": {"mode": "reference"}}
    flat = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}section {section!r} must be a mapping")
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    for key, value in flat.items():
        if key not in KEYMAP:
            raise ConfigError(f"{where}unknown key {key!r} in a reference-format config")
        if key in UNSUPPORTED_WHEN_TRUE and value:
            raise ConfigError(f"{where}{key}: {UNSUPPORTED_WHEN_TRUE[key]}")
        target = KEYMAP[key]
        if target is None or _placeholder(value):
            continue
        section, name = target.split(".")
        out.setdefault(section, {})[name] = value
    root, folder = flat.get("data.root_path"), flat.get("data.image_folder")
    if root and not _placeholder(root):
        out.setdefault("data", {})["path"] = os.path.join(root, folder or "", "train")
    if "meta.use_bfloat16" in flat:
        out.setdefault("run", {})["precision"] = "auto" if flat["meta.use_bfloat16"] else "fp32"
    if flat.get("meta.load_checkpoint"):
        ckpt = flat.get("meta.read_checkpoint")
        run_dir = out.get("run", {}).get("dir", "")
        out.setdefault("run", {})["resume"] = os.path.join(run_dir, ckpt) if ckpt else "auto"
    return out
