"""The configuration: one tree of dataclasses, YAML files and dotted command-line overrides.

``load_config(path, overrides)`` starts from the defaults below, merges a YAML file (ours, or
one of the reference implementation's, recognised by its sections), then overrides such as
``optim.lr=5e-4``. Every key is checked: an unknown key or a value of the wrong type is an error
that names the key. ``describe()`` prints every option with its documentation.

A YAML file may name another one with ``base: other.yaml`` (relative to itself, or a name in
the built-in ``configs/``); its values are applied first.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .config_reference import is_reference_config, translate_reference_config
from .config_validate import validate
from .errors import ConfigError
from .kernels.jepa_loss import KINDS as LOSSES
from .loggers import CHOICES as LOGGERS

__all__ = ["Config", "ConfigError", "DataConfig", "DistConfig", "MaskConfig", "ModelConfig", "OptimConfig",
           "PerfConfig", "RunConfig", "describe", "dump_config", "load_config"]


def opt(default, help: str, choices=None, aliases=None):
    """A documented config field; ``aliases`` maps other spellings (e.g. ``true``) to a choice."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if aliases:
        meta["aliases"] = dict(aliases)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = opt("vit_huge", "encoder size", ("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge",
                                                  "vit_giant", "custom"))
    patch_size: int = opt(14, "patch side in pixels")
    embed_dim: int = opt(192, "encoder width (name=custom only)")
    depth: int = opt(12, "encoder depth (name=custom only)")
    num_heads: int = opt(3, "encoder heads (name=custom only)")
    mlp_ratio: float = opt(4.0, "MLP width / model width (name=custom only)")
    pred_depth: int = opt(12, "predictor depth")
    pred_dim: int = opt(384, "predictor width")
    pred_heads: int | None = opt(None, "predictor heads; null = the encoder's head count (as the reference)")
    init: str = opt("released", "initialisation: 'released' = as the released training script (its second "
                    "trunc-normal pass undoes the depth rescaling), 'rescaled' = the model constructors' init "
                    "(residual projections of block i divided by sqrt(2i))", ("released", "rescaled"))
    init_std: float = opt(0.02, "std of the trunc-normal init")
    attn: str = opt("sdpa", "attention implementation", ("sdpa", "math"))
    layout: str = opt("auto", "context sequences of different lengths: 'packed' (concatenated, no padding, "
                      "variable-length attention), 'padded' (to the longest, key masks), 'auto' (packed when a fused "
                      "variable-length attention kernel runs: flash-attn, PyTorch varlen_attn or xformers on CUDA; "
                      "padded otherwise)", ("auto", "padded", "packed"))
    varlen_attn: str = opt("auto", "attention over packed sequences: 'auto' tries flash_attn, torch_varlen, "
                           "xformers, nested (any device), then padded", ("auto", "flash_attn", "torch_varlen",
                                                                           "xformers", "nested", "padded", "math"))
    kernels: str = opt("auto", "fused ops: 'auto' = Triton kernels on CUDA when Triton is installed, else the "
                       "pure-torch references; 'triton' = always Triton; 'reference' = always the references",
                       ("auto", "triton", "reference"))


@dataclass
class DataConfig:
    source: str = opt("folder", "'folder': images under data.path; 'demo': generated images (no files); "
                      "'digits': scikit-learn's handwritten digits, upsampled to data.demo_size",
                      ("folder", "demo", "digits"))
    path: str | None = opt(None, "image folder: ImageNet layout (class sub-folders) or flat; or a shard folder "
                           "written by `ijepa-fast shard` (found by its index.json)")
    batch_size: int = opt(128, "images per step per process")
    crop_size: int = opt(224, "training resolution (RandomResizedCrop output side)")
    crop_scale: tuple[float, float] = opt((0.3, 1.0), "RandomResizedCrop area range")
    crop_ratio: tuple[float, float] = opt((0.75, 4 / 3), "RandomResizedCrop aspect range")
    hflip: bool = opt(False, "random horizontal flip (off in the released recipes)")
    mean: tuple[float, float, float] = opt((0.485, 0.456, 0.406), "normalisation mean")
    std: tuple[float, float, float] = opt((0.229, 0.224, 0.225), "normalisation std")
    loader: str = opt("auto", "'dali' (decode and augment with NVIDIA DALI, on the GPU when there is one), 'pil' "
                      "(Pillow in worker processes), 'auto' (DALI for image and shard folders on CUDA when installed), "
                      "or 'dali_webdataset' (shard folders through DALI's own webdataset reader: DALI's order, see "
                      "docs/training.md)", ("auto", "dali", "pil", "dali_webdataset"))
    num_workers: int = opt(8, "data-loading worker processes (0 = in the main process)")
    pin_memory: bool = opt(True, "pin host batches (CUDA only)")
    demo_images: int = opt(2048, "number of generated images (source=demo)")
    demo_size: int = opt(48, "side of the generated images (source=demo)")


@dataclass
class MaskConfig:
    mode: str = opt("default", "'default': corrected sampler (every position reachable, no truncation); "
                    "'reference': the released sampler's exact semantics", ("default", "reference"))
    num_targets: int = opt(4, "target blocks per image")
    target_scale: tuple[float, float] = opt((0.15, 0.2), "target block area, fraction of the grid")
    target_aspect: tuple[float, float] = opt((0.75, 1.5), "target block aspect (height / width)")
    num_context: int = opt(1, "context blocks per image")
    context_scale: tuple[float, float] = opt((0.85, 1.0), "context block area, fraction of the grid")
    min_keep: int = opt(10, "a context block must keep more than this many patches")
    allow_overlap: bool = opt(False, "let the context overlap the targets")
    sampler: str = opt("auto", "implementation: 'cpp' (csrc/, compiled at first use and cached), 'python', or "
                       "'auto' (cpp when it builds); both draw identical masks", ("auto", "cpp", "python"))


@dataclass
class OptimConfig:
    epochs: int = opt(300, "training epochs (the schedules span epochs * ipe_scale)")
    warmup: float = opt(40.0, "linear LR warm-up, in epochs")
    start_lr: float = opt(2e-4, "LR at the start of warm-up")
    lr: float = opt(1e-3, "peak LR (after warm-up)")
    final_lr: float = opt(1e-6, "LR at the end of the cosine decay")
    weight_decay: float = opt(0.04, "initial weight decay (cosine schedule)")
    final_weight_decay: float = opt(0.4, "final weight decay")
    ipe_scale: float = opt(1.0, "schedule length multiplier")
    ema: tuple[float, float] = opt((0.996, 1.0), "target-encoder EMA momentum, start and end")
    ema_schedule: str = opt("linear", "momentum ramp: 'linear' (released code) or 'cosine' (paper text)",
                            ("linear", "cosine"))
    loss: str = opt("smooth_l1", "'smooth_l1' (released code, beta 1) or 'mse' (paper text)", LOSSES)
    grad_clip: float | None = opt(None, "clip the global gradient norm to this value (null = off)")
    accum_steps: int = opt(1, "split each process's batch into this many micro-batches (gradient accumulation; "
                           "less memory, the same step)")
    lr_scaling: str = opt("none", "'none': the learning rates as given (the published recipes were tuned for a global "
                          "batch of 2048); 'linear': multiplied by global batch / optim.base_batch", ("none", "linear"))
    base_batch: int = opt(2048, "the global batch the learning rates are given for (lr_scaling=linear)")
    on_nonfinite: str = opt("stop", "a NaN or infinite loss or gradient: 'stop' (checkpoint intact, clear message) "
                            "or 'skip' the step (at most 10 in a row)", ("stop", "skip"))
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")


@dataclass
class PerfConfig:
    bf16_weights: bool = opt(False, "run forward and backward on a bf16 copy of the weights without autocast (bf16 "
                             "activations and residual stream); fp32 master weights stay in the optimiser, the EMA "
                             "and the checkpoints")
    activation_checkpointing: bool | str = opt(False, "recompute each encoder and predictor block in the backward "
                                               "pass: 'full' (or true: the whole block; least memory, about a "
                                               "third more compute) or 'selective' (keep matmul and attention "
                                               "outputs, recompute layer norms, GELU, adds)",
                                               (False, True, "full", "selective"))
    selective_blocks: str = opt("all", "with activation_checkpointing=selective: the blocks that recompute "
                                "selectively; the others recompute fully ('predictor': its many short "
                                "sequences hold most activations)", ("all", "predictor", "encoder"))
    token_buckets: int = opt(0, "round the batch's token counts up to this many sizes per doubling (padding "
                             "masked out: the same loss and gradients); with compile, static shapes and one "
                             "compilation per bucket; 0 = off", (0, 1, 2, 4, 8, 16))
    compile: bool = opt(False, "torch.compile each transformer block (dynamic shapes: no recompiles as lengths "
                        "change; static shapes with token_buckets)")
    fp8: str = opt("false", "float8 matmuls in the context and target encoders' linear layers (torchao; CUDA compute "
                   "capability >= 8.9): 'rowwise' or 'tensorwise' scaling, 'false' = off (true = rowwise); the "
                   "predictor, the weights of record and the checkpoints are unchanged",
                   ("false", "rowwise", "tensorwise"), aliases={True: "rowwise", False: "false", "true": "rowwise"})
    fp8_emulate: bool = opt(False, "for testing: emulate the FP8 casts with high-precision matmuls on any device "
                            "(the FP8 numerics, no speed-up)")
    optimizer: str = opt("auto", "AdamW implementation: 'fused', 'foreach', 'single' (torch), or 'fused_tail' (AdamW, "
                         "the target EMA and the bf16 copy in one Triton pass per group); 'auto' = fused on CUDA, "
                         "foreach elsewhere (fused_tail is opt-in until it has been checked on a GPU)",
                         ("auto", "fused", "foreach", "single", "fused_tail"))


@dataclass
class DistConfig:
    strategy: str = opt("auto", "several processes: 'ddp' (DistributedDataParallel), 'fsdp' (FSDP2 fully_shard, "
                        "sharded checkpoints), 'auto' (ddp), 'none'", ("auto", "ddp", "fsdp", "none"))
    backend: str = opt("auto", "process group backend: 'auto' = nccl on GPUs, gloo on CPUs", ("auto", "nccl", "gloo"))


@dataclass
class RunConfig:
    out_dir: str = opt("runs", "parent folder of run folders")
    name: str | None = opt(None, "run folder name (null = config name and a timestamp)")
    dir: str | None = opt(None, "explicit run folder (overrides out_dir/name)")
    tag: str = opt("jepa", "checkpoint file prefix: <tag>-latest.pth.tar")
    seed: int = opt(0, "seed of weights, masks, data order and augmentation")
    device: str = opt("auto", "'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    precision: str = opt("auto", "'auto' = bf16 autocast on CUDA, fp32 on CPU", ("auto", "bf16", "fp32"))
    threads: int | None = opt(None, "CPU threads for torch (null = torch's default)")
    deterministic: bool = opt(False, "bit-reproducible runs: deterministic scatter in the fused token gather, "
                              "torch's deterministic algorithms (slower)")
    max_steps: int | None = opt(None, "stop after this many steps (schedules still span the full run)")
    log_every: int = opt(10, "steps between log rows")
    checkpoint_every: int = opt(0, "steps between checkpoints (0 = at the end of every epoch)")
    keep_every_epochs: int = opt(50, "also keep <tag>-ep<N>.pth.tar every N epochs (0 = never)")
    keep_last: int = opt(2, "step checkpoints kept (the newest ones; <tag>-latest always names the newest)")
    resume: str | None = opt("auto", "'auto' = continue from the run folder's latest checkpoint; "
                                       "a path = start from that checkpoint; null = start fresh")
    monitor_every: int = opt(200, "steps between collapse checks of the target features (0 = off)")
    monitor_images: int = opt(256, "images the collapse monitor embeds")
    collapse_std: float = opt(0.01, "warn when the target features' mean per-dimension std falls below this")
    collapse_rank: float = opt(0.25, "warn when their effective rank falls below this fraction of its first value")
    progress: bool = opt(True, "show a progress bar")
    plot: bool = opt(True, "write loss.png into the run folder")
    loggers: list[str] = opt(["jsonl"], "where metric rows go: metrics.jsonl (and .csv) are always written; add "
                             "'tensorboard' (<run folder>/tensorboard) or 'wandb' (Weights & Biases), e.g. "
                             "run.loggers=[jsonl,tensorboard]", LOGGERS)
    wandb_project: str = opt("ijepa-fast", "Weights & Biases project (run.loggers has wandb)")
    wandb_entity: str | None = opt(None, "Weights & Biases entity (null = the account's default)")
    wandb_mode: str = opt("auto", "Weights & Biases mode: 'auto' = $WANDB_MODE, else online; 'offline' writes "
                          "only into the run folder (upload later with `wandb sync`)",
                          ("auto", "online", "offline", "disabled"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# merging and type checking

def _coerce(key: str, value, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:  # X | None, or X | Y: the first that fits
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) < len(args) and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
            return None
        for a in kinds[:-1]:
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        return _coerce(key, value, kinds[-1])
    if origin is list:  # a YAML list, or one name / comma-separated names on the command line
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        bad = isinstance(value, bool) or not isinstance(value, (int, str))
        if bad or (isinstance(value, str) and not _is_int(value)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported option type {tp}")


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _unknown(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def merge(obj, values: dict, prefix: str = "") -> None:
    """Merge a nested dict into a config dataclass in place, checking every key and value."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = prefix + str(key)
        if key not in fields:
            raise _unknown(full, fields)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, full + ".")
            continue
        aliases = fields[key].metadata.get("aliases")
        if aliases and isinstance(value, (bool, str)):
            value = aliases.get(value.lower() if isinstance(value, str) else value, value)
        new = _coerce(full, value, hints[key])
        choices = fields[key].metadata.get("choices")
        for item in (new if isinstance(new, list) else [new]):
            if choices and item not in choices:
                raise ConfigError(f"{full}: {item!r} is not one of {', '.join(map(repr, choices))}")
        setattr(obj, key, new)


def parse_override(text: str) -> dict:
    """'optim.lr=5e-4' -> {'optim': {'lr': 0.0005}} (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def read_yaml(path: Path, _seen=()) -> dict:
    """A YAML config as a dict in our layout (reference files are translated), bases resolved."""
    import yaml

    path = Path(path)
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    if is_reference_config(data):
        return translate_reference_config(data, path)
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base) if (path.parent / base).exists() else find_config(base)
    merged = read_yaml(base_path, _seen + (path,))
    _deep_update(merged, data)
    return merged


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def config_dir() -> Path:
    """The built-in configs/ folder (installed with the package, or beside it in a checkout)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "configs", here.parent / "configs"):
        if cand.is_dir():
            return cand
    raise ConfigError("the built-in configs/ folder is missing from this installation")


def find_config(name: str) -> Path:
    """A config path, or the name of a built-in config (with or without .yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    cand = config_dir() / f"{stem}.yaml"
    if cand.is_file():
        return cand
    names = sorted(q.stem for q in config_dir().glob("*.yaml"))
    raise ConfigError(f"config {name!r} not found: not a file, nor a built-in config ({', '.join(names)})")


def load_config(path=None, overrides=()) -> Config:
    """Defaults <- YAML file (optional) <- overrides, checked; see the module docstring."""
    cfg = Config()
    if path is not None:
        merge(cfg, read_yaml(find_config(str(path))))
    for text in overrides:
        merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


def describe(obj=None, prefix: str = "") -> str:
    """Every option, one per line: key, default, documentation."""
    obj = obj or Config()
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(describe(value, prefix + f.name + "."))
        else:
            choices = f.metadata.get("choices")
            extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
            lines.append(f"{prefix + f.name:26s} {_plain(value)!s:24s} {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)


def dump_config(cfg: Config, path: Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
