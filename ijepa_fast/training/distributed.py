"""Multi-process training: the launch environment, DDP / FSDP2 wrapping, and the few collectives
the trainer needs.

Launchers: ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and SLURM's
``srun`` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR defaults to the first host of
SLURM_JOB_NODELIST, MASTER_PORT to 29500). A single process needs neither. The process group uses
NCCL on GPUs and gloo on CPUs, and each process takes the GPU ``cuda:LOCAL_RANK`` (the environment
is read, nothing is overwritten).

Strategies (``dist.strategy``):

- ``ddp``: DistributedDataParallel over the whole I-JEPA module; only the encoder and predictor
  have gradients (the target encoder is updated by the EMA, identically on every rank);
  ``static_graph`` when no gradient accumulation is used. With ``perf.bf16_weights`` the
  gradients are reduced in fp32 instead: each micro-batch's bf16 gradients are added into the fp32
  master gradients, which ``all_reduce_grads`` averages once per step (as the reference reduces
  fp32 gradients; DDP over the bf16 compute copy would average in bf16).
- ``fsdp``: FSDP2 ``fully_shard`` on every transformer block and on the root, for the encoder,
  the predictor and the target encoder alike, so their shards line up and the EMA runs shard by
  shard on local tensors; bf16 parameters and fp32 gradient reduction on GPUs.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..runlog.output import log


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launcher: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> DistEnv:
    """The launch environment (torchrun, srun, or a single process)."""
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in e and int(e.get("SLURM_NTASKS", "1")) > 1:
        e.setdefault("MASTER_ADDR", first_host(e.get("SLURM_JOB_NODELIST", e.get("SLURM_NODELIST", "localhost"))))
        e.setdefault("MASTER_PORT", "29500")
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)), "srun")
    return DistEnv()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,009],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return "localhost"
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def init(env: DistEnv, device: torch.device, backend: str = "auto") -> None:
    """Join the process group (once) when there is more than one process."""
    if env.world == 1 or (dist.is_available() and dist.is_initialized()):
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world)
    log.info(f"process group: {backend}, rank {env.rank} of {env.world} ({env.launcher}, local rank {env.local_rank})")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def all_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is True on every rank (so every rank takes the same branch)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_rank(flag: bool, device: torch.device) -> bool:
    return not all_agree(not flag, device)


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_grads(params, bucket_bytes: int = 64 << 20) -> None:
    """Average the gradients of ``params`` over every process, in their own dtype (fp32 master
    gradients under ``perf.bf16_weights``), one all-reduce per bucket of about ``bucket_bytes``. A
    parameter without a gradient counts as zero, so every process reduces the same buckets."""
    if not active():
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    world = dist.get_world_size()
    bucket, size = [], 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= bucket_bytes or i == len(grads) - 1:
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat.div_(world)
            torch._foreach_copy_(bucket, torch._utils._unflatten_dense_tensors(flat, bucket))
            bucket, size = [], 0


def broadcast_params(module: torch.nn.Module, src: int = 0) -> None:
    """Every process takes rank ``src``'s parameters and buffers (what DDP does when it wraps)."""
    if not active():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


def data_parallel(run_model, master, strategy: str, device: torch.device, static_graph: bool = True):
    """How the step runs over processes: (the module to call for the loss, a gradient reduction
    for ``train_step`` or None). With bf16 compute weights (``master``, a ``perf.MasterWeights``)
    under DDP, the fp32 master gradients are averaged in fp32 by ``all_reduce_grads`` after the
    last micro-batch (rank 0's weights broadcast first, as DDP would); otherwise ``wrap``."""
    if master is not None and strategy == "ddp" and active():
        broadcast_params(master.master)
        log.info("data parallel: the fp32 master gradients are averaged in fp32 (one all-reduce per 64 MB bucket, "
                 "after the last micro-batch)")
        return run_model, all_reduce_grads
    return wrap(run_model, strategy, device, static_graph), None


def wrap(model, strategy: str, device: torch.device, static_graph: bool = True):
    """The module to run the loss through: DDP or FSDP2 around ``model`` (an IJEPA), or ``model``."""
    if strategy == "none" or not active():
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # the model's only buffers are the FP8 target weights (perf.fp8=target), which every process casts
        # from its own, identical target master: nothing to broadcast before each forward
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, static_graph=static_graph,
                   gradient_as_bucket_view=True, broadcast_buffers=False)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for blocks in (model.encoder.blocks, model.target_encoder.blocks, model.predictor.predictor_blocks):
            for blk in blocks:
                fully_shard(blk, mp_policy=mp)
        for part in (model.encoder, model.target_encoder, model.predictor):
            fully_shard(part, mp_policy=mp)
        return model
    raise ValueError(f"unknown dist.strategy {strategy!r}; use none, ddp or fsdp")


class StopSignals:
    """SIGTERM / SIGUSR1 (preemption notices) and a first SIGINT (Ctrl-C) set a flag; the trainer
    finishes the current step, checkpoints and exits. A second SIGINT stops at once
    (KeyboardInterrupt)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None),
                                getattr(signal, "SIGINT", None)) if s)

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT":
            if self.received == "SIGINT":  # the second Ctrl-C: stop now
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            print("\nCtrl-C: stopping after this step with a checkpoint (press Ctrl-C again to stop at once, "
                  "losing the steps since the last checkpoint)", file=sys.stderr, flush=True)
        if self.received is None or name == "SIGINT":
            self.received = name

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        return False
