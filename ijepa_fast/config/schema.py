"""The configuration's schema: one tree of dataclasses, every field documented where it is declared
(``opt``). Loading, merging and describing live in ``config``, which re-exports these names."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..kernels.jepa_loss import KINDS as LOSSES
from ..runlog.loggers import CHOICES as LOGGERS


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
    batch_size: int = opt(128, "images per step per process; with data.global_batch: the micro-batch, images per "
                          "forward and backward pass on each process (the most that fits its memory)")
    global_batch: int | None = opt(None, "images per optimiser step over all processes (the published recipes: "
                                   "2048): each process takes global_batch / processes, data.batch_size at a time, "
                                   "accumulating gradients (optim.accum_steps derived); null = data.batch_size x "
                                   "processes")
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
                           "less memory, the same step); derived, and left at 1, with data.global_batch")
    lr_scaling: str = opt("none", "'none': the learning rates as given (the published recipes were tuned for a global "
                          "batch of 2048); 'linear': multiplied by global batch / optim.base_batch", ("none", "linear"))
    base_batch: int = opt(2048, "the global batch the learning rates are given for (lr_scaling=linear)")
    on_nonfinite: str = opt("stop", "a NaN or infinite loss or gradient: 'stop' (checkpoint intact, clear message) "
                            "or 'skip' the step (at most 10 in a row)", ("stop", "skip"))
    betas: tuple[float, float] = opt((0.9, 0.999), "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")


@dataclass
class PerfConfig:
    """Every switch defaults to 'auto': resolved per device in one place (``perf.resolve``), to the
    fastest measured step there; the resolved values are logged and written to the run's config.yaml."""

    preset: str = opt("auto", "what the 'auto' switches resolve to: 'auto' = the fastest measured step on the "
                      "run's device (on CUDA: bf16_weights, compile with token_buckets=4, fused AdamW; on the CPU "
                      "the plain step), 'plain' = the plain step (fp32 weights under autocast, eager, no buckets; "
                      "for debugging); 'fast' = auto (what a resolved config records). Switches set by hand win over "
                      "either",
                      ("auto", "fast", "plain"))
    bf16_weights: bool | str = opt("auto", "run forward and backward on a bf16 copy of the weights without autocast "
                                   "(bf16 activations and residual stream); fp32 master weights stay in the "
                                   "optimiser, the EMA and the checkpoints; auto = on CUDA (not under FSDP)",
                                   ("auto", True, False))
    activation_checkpointing: bool | str = opt("auto", "recompute each encoder and predictor block in the backward "
                                               "pass: 'full' (or true: the whole block; least memory, about a "
                                               "third more compute) or 'selective' (keep matmul and attention "
                                               "outputs, recompute layer norms, GELU, adds); auto = off",
                                               ("auto", False, True, "full", "selective"),
                                               aliases={"none": False, "off": False})
    selective_blocks: str = opt("all", "with activation_checkpointing=selective: the blocks that recompute "
                                "selectively; the others recompute fully ('predictor': its many short "
                                "sequences hold most activations)", ("all", "predictor", "encoder"))
    token_buckets: int | str = opt("auto", "round the batch's token counts up to this many sizes per doubling "
                                   "(padding masked out: the same loss and gradients); with compile, static shapes "
                                   "and one compilation per bucket; 0 = off (not with compile); auto = 4 with "
                                   "compile, else 0", ("auto", 0, 1, 2, 4, 8, 16))
    compile: bool | str = opt("auto", "torch.compile each transformer block, with static shapes (token buckets: "
                              "one compilation per bucket, all of them before training); auto = on CUDA",
                              ("auto", True, False))
    fp8: str = opt("auto", "float8 matmuls in the context and target encoders' linear layers (torchao; CUDA compute "
                   "capability >= 8.9): 'rowwise' or 'tensorwise' scaling, 'false' = off (true = rowwise); the "
                   "predictor, the weights of record and the checkpoints are unchanged; 'target' = rowwise in the "
                   "target encoder's forward only, on layers of both dimensions >= fp8_min_dim (with "
                   "optimizer=fused_tail its FP8 weights are written by the tail after the EMA, without torchao); "
                   "auto = off",
                   ("auto", "false", "rowwise", "tensorwise", "target"), aliases={True: "rowwise", False: "false",
                                                                        "true": "rowwise", "none": "false",
                                                                        "off": "false"})
    fp8_min_dim: int | str = opt("auto", "with perf.fp8: convert only linear layers whose in and out features are "
                                 "both >= this (smaller matmuls lose more to the casts than FP8 saves); auto = 1024 "
                                 "under fp8=target (ViT-L/H layers qualify, ViT-B's do not), every layer with "
                                 "multiples of 16 otherwise")
    fp8_emulate: bool = opt(False, "for testing: emulate the FP8 casts with high-precision matmuls on any device "
                            "(the FP8 numerics, no speed-up)")
    optimizer: str = opt("auto", "AdamW implementation: 'fused', 'foreach', 'single' (torch), or 'fused_tail' (AdamW, "
                         "the target EMA and the bf16 copy in one Triton pass per group); 'auto' = fused_tail on CUDA "
                         "with bf16 weights (the fastest measured), torch's fused AdamW on CUDA otherwise (FSDP), "
                         "foreach elsewhere", ("auto", "fused", "foreach", "single", "fused_tail"))
    cuda_graphs: bool | str = opt("auto", "the graph-ready step: with perf.optimizer=fused_tail, lr, weight decay and "
                                  "EMA momentum live in device tensors, gradient buffers persist, nothing is read "
                                  "back (deferred step); on CUDA the whole step is captured as one CUDA graph per "
                                  "token bucket at warm-up and replayed (needs token_buckets, one process, "
                                  "accum_steps=1); auto = off until a GPU run has checked it", ("auto", True, False))


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
