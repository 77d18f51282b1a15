"""Each fused op against its reference and against the obvious torch composition.

    python benchmarks/bench_kernels.py [--models vit_base:16,vit_huge:14] [--batch 128] [--out F] [--md F]

For ViT-B/16 and ViT-H/14 at batch 128 (224 px): median time of many runs (CUDA events through
triton.testing.do_bench), the bytes each op must move, GB/s, and that as a fraction of this
card's copy bandwidth, measured in the same run. One JSON object per line.

``--device cpu --models tiny --repeats 2`` runs every case on small sizes under the Triton
interpreter (a smoke test: the figures mean nothing there).
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
from common import emit, environment, time_host, write_markdown

SIZES = {"vit_base": (768, 12), "vit_huge": (1280, 32), "tiny": (80, 2)}
PRED_DIM = 384
N_TARGETS = 4


def bench(fn, device, repeats):
    """Median milliseconds of fn(): CUDA events through triton's do_bench on a GPU, host time elsewhere."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(repeats, 1) * 20, return_mode="median")
    return statistics.median(time_host(fn, repeats, warmup=1))


def copy_bandwidth(device, repeats) -> float:
    """Bytes per second of a large device copy (read + write)."""
    n = (1 << 28) if device == "cuda" else (1 << 20)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x), device, repeats)
    return 2 * n / (ms * 1e-3)


def encoder_params(dim, depth, device):
    """The tensors of a ViT encoder of this width and depth (fp32), as the EMA sees them."""
    from ijepa_fast.models import VisionTransformer

    with torch.device("meta"):
        enc = VisionTransformer(224, 14 if dim == 1280 else 16, embed_dim=dim, depth=depth,
                                num_heads=16 if dim % 16 == 0 else 1)
    return [torch.randn(p.shape, device=device) for p in enc.parameters()]


def cases(model, batch, device):
    """(batch used, [(op, provider, fn, bytes moved)]) for every op and provider at this model's sizes."""
    from ijepa_fast.kernels.ema import ema_reference, ema_update_
    from ijepa_fast.kernels.gather_layernorm import gather_layernorm, gather_layernorm_reference
    from ijepa_fast.kernels.gather_tokens import gather_tokens, gather_tokens_reference
    from ijepa_fast.kernels.jepa_loss import jepa_loss, jepa_loss_reference
    from ijepa_fast.kernels.predictor_tokens import predictor_tokens, predictor_tokens_reference

    dim, depth = SIZES[model]
    n = 256 if model != "vit_base" else 196
    lc, lt = (108, 44) if model != "tiny" else (12, 5)
    if model == "tiny":
        n, batch = 32, min(batch, 4)
    bf = torch.bfloat16
    out = []
    # EMA over the encoder's parameters (fp32)
    tgt, src = encoder_params(dim, depth, device), encoder_params(dim, depth, device)
    ema_bytes = sum(t.numel() for t in tgt) * 4 * 3

    def python_loop():
        for t, s in zip(tgt, src):
            t.mul_(0.996).add_((1 - 0.996) * s)

    out += [("ema", "triton", lambda: ema_update_(tgt, src, 0.996, backend="triton"), ema_bytes),
            ("ema", "reference (foreach mul + add)", lambda: ema_reference(tgt, src, 0.996), ema_bytes),
            ("ema", "torch._foreach_lerp_", lambda: torch._foreach_lerp_(tgt, src, 1 - 0.996), ema_bytes),
            ("ema", "python loop (released code)", python_loop, ema_bytes)]
    # context gather + positional add (bf16 tokens, fp32 table -> fp32 out), forward and backward
    x = torch.randn(batch, n, dim, device=device, dtype=bf, requires_grad=True)
    pos = torch.randn(n, dim, device=device)
    idx = torch.stack([torch.randperm(n, device=device)[:lc] for _ in range(batch)])
    g_bytes = batch * lc * dim * (2 + 4 + 4) + idx.numel() * 8
    gout = torch.randn(batch, lc, dim, device=device)

    def composition():
        return torch.gather(x + pos, 1, idx.unsqueeze(-1).expand(-1, -1, dim))

    for name, fwd in (("triton", lambda: gather_tokens(x, idx, pos, backend="triton")),
                      ("reference", lambda: gather_tokens_reference(x, idx, pos)),
                      ("torch (add then gather)", composition)):
        out.append(("gather_tokens fwd", name, fwd, g_bytes))
        y = fwd()
        out.append(("gather_tokens bwd", name, lambda y=y: torch.autograd.grad(y, x, gout, retain_graph=True),
                    batch * lc * dim * (4 + 4) + batch * n * dim * 2))
    # target layer norm at the target rows (fp32 target-encoder output)
    h = torch.randn(batch, n, dim, device=device)
    tidx = torch.stack([torch.randperm(n, device=device)[:lt] for _ in range(N_TARGETS * batch)])
    ln_bytes = N_TARGETS * batch * lt * dim * 8
    out += [("gather_layernorm", "triton", lambda: gather_layernorm(h, tidx, backend="triton"), ln_bytes),
            ("gather_layernorm", "reference (norm all, gather)", lambda: gather_layernorm_reference(h, tidx),
             ln_bytes)]
    # predictor input sequences (bf16 embedded context, fp32 table and token -> fp32)
    xp = torch.randn(batch, lc, PRED_DIM, device=device, dtype=bf, requires_grad=True)
    tok = torch.randn(1, 1, PRED_DIM, device=device, requires_grad=True)
    ppos = torch.randn(n, PRED_DIM, device=device)
    p_bytes = N_TARGETS * batch * (lc + lt) * PRED_DIM * 4 + batch * lc * PRED_DIM * 2
    for name, fwd in (("triton", lambda: predictor_tokens(xp, idx, tidx[:N_TARGETS * batch], tok, ppos, N_TARGETS,
                                                            backend="triton")),
                      ("reference", lambda: predictor_tokens_reference(xp, idx, tidx[:N_TARGETS * batch], tok, ppos,
                                                                       N_TARGETS))):
        out.append(("predictor_tokens fwd", name, fwd, p_bytes))
        y = fwd()
        gy = torch.randn_like(y)
        out.append(("predictor_tokens bwd", name,
                    lambda y=y, gy=gy: torch.autograd.grad(y, (xp, tok), gy, retain_graph=True), p_bytes))
    # the loss, value and gradient (bf16 predictions, fp32 targets)
    pred = torch.randn(N_TARGETS * batch, lt, dim, device=device, dtype=bf, requires_grad=True)
    target = torch.randn(N_TARGETS * batch, lt, dim, device=device)
    l_bytes = pred.numel() * (2 + 4 + 2)

    def loss_fb(fn):
        return lambda: torch.autograd.grad(fn(), pred)

    out += [("jepa_loss fwd+bwd", "triton", loss_fb(lambda: jepa_loss(pred, target, backend="triton")), l_bytes),
            ("jepa_loss fwd+bwd", "reference (F.smooth_l1_loss)",
             loss_fb(lambda: jepa_loss_reference(pred, target)), l_bytes)]
    return batch, out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_base,vit_huge")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out")
    p.add_argument("--md")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    env = environment(args.device)
    bw = copy_bandwidth(args.device, args.repeats)
    emit({"bench": "copy_bandwidth", "device": args.device, "GB_per_s": round(bw / 1e9, 1), **env}, args.out)
    rows = []
    for model in args.models.split(","):
        model = model.split(":")[0]
        batch, todo = cases(model, args.batch, args.device)
        for op, provider, fn, nbytes in todo:
            ms = bench(fn, args.device, args.repeats)
            rows.append({"bench": "kernels", "model": model, "batch": batch, "op": op, "provider": provider,
                         "median_ms": round(ms, 4), "GB_per_s": round(nbytes / (ms * 1e-3) / 1e9, 1),
                         "of_copy_bw": round(nbytes / (ms * 1e-3) / bw, 3), **env})
            emit(rows[-1], args.out)
    if args.md and rows:
        write_markdown(args.md, "Fused kernels against their references", "python benchmarks/bench_kernels.py",
                       rows, [("model", "model"), ("op", "op"), ("provider", "provider"), ("median_ms", "median ms"),
                              ("GB_per_s", "GB/s"), ("of_copy_bw", "of copy bandwidth")],
                       f"Copy bandwidth measured in the same run: {bw / 1e9:.0f} GB/s (read + write). Bytes are the "
                       "minimum each op must move (inputs read once, outputs written once).")


if __name__ == "__main__":
    main()
