"""Where the training step's time goes: device time by category, host synchronisations, recompiles.

    python benchmarks/profile_step.py [--model vit_huge --patch 14 --img 224 --batch 128 --pred-depth 12]
                                      [--masks default] [--path fast] [--warmup 5] [--steps 3]
                                      [--device cuda] [--out F.jsonl] [--md F.md] [--plant-sync]
                                      [--perf optimizer=fused_tail,token_buckets=4]

The step is built as ``ijepa_fast/bench/step.py`` builds it, by ``Engine.from_config``: with
``--path fast`` the step ``ijepa-fast train`` runs with the recipe as shipped (every perf switch
'auto': on CUDA bf16 compute weights, per-block torch.compile with token buckets, the Triton
kernels, fused AdamW), ``--path plain`` the plain step. After the warm-up, each of ``--steps`` steps runs under
torch.profiler and prints one line: device time by category (GEMM, attention, the engine's Triton
ops, optimiser and EMA, copies, other kernels, which includes torch.compile's fused kernels), the
synchronisation events the profiler saw (CUDA), new torch.compile compilations and graph breaks,
and allocator retries (CUDA). One more step then runs under ``ijepa_fast.bench.profiling.count_host_syncs``
(and, on CUDA, ``torch.cuda.set_sync_debug_mode('warn')``): its host synchronisations, with the
source line of each. Without CUDA the "device" times are the CPU ops' own times.

``--plant-sync`` adds one ``.item()`` per step (a check that the counters count). ``--perf`` sets
perf.* keys on the fast path (as ``bench_step.py --perf``): with ``optimizer=fused_tail`` the step is
the deferred 0-sync one (the fused tail decides finiteness on the device).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

from common import emit, environment, write_markdown

CATEGORIES = ("gemm", "attention", "triton_ops", "optimizer_ema", "copies", "other")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
               "Memcpy DtoH")
_GEMM = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
         "aten::addbmm", "convolution", "aten::_convolution", "mkldnn_convolution")
_ATTN = ("flash", "fmha", "attention", "attn", "aten::_softmax")
_COPY = ("memcpy", "memset", "aten::copy_", "aten::_to_copy", "copy_kernel", "copyfunctor")
_OPTIM = ("optimizer.step", "optimizer.zero_grad", "update_target", "ijepa_fast::ema_update")


def category(name: str, ancestors: list[str]) -> str:
    """The category of a kernel (or CPU op) of this name launched under these enclosing ranges."""
    low = name.lower()
    if any(a.lower().startswith(_OPTIM) or a.lower() == "update_target" for a in ancestors + [name]):
        return "optimizer_ema"
    if any(k in low for k in _COPY):
        return "copies"
    if any(k in low for k in _GEMM):
        return "gemm"
    if any(k in low for k in _ATTN):
        return "attention"
    if any(a.startswith("ijepa_fast::") for a in ancestors + [name]):
        return "triton_ops"
    return "other"


def _ancestors(evt) -> list[str]:
    out, p = [], evt.cpu_parent
    while p is not None:
        out.append(p.name)
        p = p.cpu_parent
    return out


def device_breakdown(events, cuda: bool) -> dict:
    """{'total_ms', category: ms} over one profiled step's events."""
    from torch.autograd import DeviceType

    cats = dict.fromkeys(CATEGORIES, 0.0)
    total = 0.0
    for evt in events:
        if cuda:
            if evt.device_type == DeviceType.CUDA:
                total += evt.time_range.elapsed_us()
            elif evt.kernels:
                anc = _ancestors(evt) + [evt.name]
                for k in evt.kernels:
                    cats[category(k.name, anc)] += k.duration
        elif evt.device_type == DeviceType.CPU:
            own = max(evt.self_cpu_time_total, 0.0)
            total += own
            cats[category(evt.name, _ancestors(evt))] += own
    row = {k: round(v / 1e3, 3) for k, v in cats.items()}
    row["total_ms"] = round(total / 1e3, 3)
    return row


def sync_events(events) -> dict:
    seen = Counter(e.name for e in events if any(e.name.startswith(s) for s in SYNC_EVENTS))
    return dict(seen)


def build(args, device):
    """The step ``ijepa_fast.bench.step.build_step`` builds (the one ``bench`` times), with the EMA named
    in the profile and, on request, a planted host sync."""
    import torch
    from bench_step import parse_variant

    from ijepa_fast.bench.step import BenchSpec, build_step
    from ijepa_fast.config import MaskConfig

    spec = BenchSpec(model=args.model, patch=args.patch, img=args.img, batch=args.batch, pred_depth=args.pred_depth,
                     mask_mode=args.masks, fast=args.path == "fast", device=str(device),
                     perf=parse_variant(args.perf) if args.perf else {})
    mask = MaskConfig(mode=args.masks, **({"min_keep": args.min_keep} if args.min_keep else {}))
    setup = build_step(spec, args.warmup + args.steps + 1, mask)
    model = setup.model
    update_target = model.update_target

    def annotated_update(momentum):  # a named range, so the EMA's kernels are told apart
        with torch.profiler.record_function("update_target"):
            update_target(momentum)

    model.update_target = annotated_update

    def step(i):
        if args.plant_sync:
            setup.images[0, 0, 0, 0].item()
        return setup.step(i)

    setup.engine.warm_up(args.batch)
    return step, model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_huge")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pred-depth", type=int, default=12)
    p.add_argument("--masks", default="default", choices=("default", "reference"))
    p.add_argument("--min-keep", type=int, help="mask.min_keep (lower it for tiny grids)")
    p.add_argument("--path", default="fast", choices=("fast", "plain"))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--plant-sync", action="store_true", help="add one .item() per step (checks the counters)")
    p.add_argument("--perf", metavar="KEY=VALUE[,KEY=VALUE]", help="perf.* settings of the fast path")
    p.add_argument("--out")
    p.add_argument("--md")
    args = p.parse_args()

    import torch
    from torch._dynamo.utils import counters
    from torch.profiler import ProfilerActivity, profile

    from ijepa_fast.bench.profiling import count_host_syncs
    from ijepa_fast.bench.step import check_model

    check_model(args.model)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    step, model = build(args, device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(args.warmup):
        step(i)
    sync()

    def compile_state():
        return (counters["frames"].get("ok", 0), sum(counters["graph_break"].values()),
                torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if cuda else 0)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = []
    for i in range(args.warmup, args.warmup + args.steps):
        before = compile_state()
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            res = step(i)
            sync()
        wall = (time.perf_counter() - t) * 1e3
        after = compile_state()
        events = prof.events()
        steps.append({"step": i, "wall_ms": round(wall, 2), **device_breakdown(events, cuda),
                      "profiler_syncs": sync_events(events), "compiles": after[0] - before[0],
                      "graph_breaks": after[1] - before[1], "alloc_retries": after[2] - before[2],
                      "loss": round(float(res.loss), 4)})
        print(f"step {i}: {steps[-1]}", flush=True)

    with count_host_syncs(cuda_debug=cuda) as syncs:
        step(args.warmup + args.steps)
        sync()
    print(syncs.report(), flush=True)
    env = environment(args.device)
    row = {"bench": "profile_step", "model": args.model, "patch": args.patch, "img": args.img, "batch": args.batch,
           "pred_depth": args.pred_depth, "masks": args.masks, "path": args.path, "device": str(device),
           "kernels": model.kernels, "layout": model.layout, "planted_sync": args.plant_sync, "steps": steps,
           "perf": args.perf or "",
           "host_syncs": syncs.total, "host_syncs_by_location": syncs.by_location(),
           "cuda_sync_warnings": len(syncs.cuda_warnings),
           "cuda_sync_warnings_at": [f"{w.where}: {w.why}" for w in syncs.cuda_warnings][:10],
           "median": {k: statistics.median(s[k] for s in steps) for k in ("wall_ms", "total_ms") + CATEGORIES},
           **env}
    emit(row, args.out)
    if args.md:
        table = [{**s, "syncs": sum(s["profiler_syncs"].values()), **env} for s in steps]
        cols = [("step", "step"), ("wall_ms", "wall ms"), ("total_ms", "device ms")] + \
            [(c, f"{c} ms") for c in CATEGORIES] + \
            [("syncs", "profiler sync events"), ("compiles", "compiles"), ("graph_breaks", "graph breaks"),
             ("alloc_retries", "alloc retries")]
        where = "; ".join(f"{n} x {k}" for k, n in syncs.by_location().items()) or "none"
        notes = (f"{args.model} patch {args.patch} at {args.img}px, batch {args.batch}, {args.masks} masks, "
                 f"{args.path} path (kernels {model.kernels}, layout {model.layout}). Host synchronisations in one "
                 f"more step (ijepa_fast.bench.profiling): {syncs.total} ({where}).")
        write_markdown(args.md, "Profile of the training step", "python benchmarks/profile_step.py", table, cols,
                       notes)


if __name__ == "__main__":
    main()
