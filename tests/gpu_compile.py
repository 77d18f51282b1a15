"""Compile every Triton kernel for a GPU, with no GPU: ``python tests/gpu_compile.py [--arch 90]``.

The kernel tests run under Triton's interpreter on a machine without a GPU, which never runs
Triton's compiler, so a kernel can pass them and still fail to compile for a card. This script
calls every op's Triton path (forward and backward) on CPU tensors over a spread of sizes and
dtypes, with Triton's launcher switched to compile-only (``warmup=True``) and a stand-in driver
that names the target card. Each launch goes through Triton's own argument specialisation (16-byte
alignment of pointers, sizes divisible by 16) and its full compiler pipeline down to the
card's machine code. Prints one line per compiled kernel variant and exits non-zero, naming each
failing launch, if any variant fails.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

try:  # the installed engine; in a bare checkout, the source tree
    import ijepa_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Driver:
    """The parts of a Triton driver that compiling (not launching) asks for."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def install(arch: int) -> list[str]:
    """Compile-only launches for ``arch``; returns the list the compiled variants are logged to."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from ijepa_fast.kernels import (
        adamw_tail,
        dispatch,
        ema,
        fp8_rows,
        gather_layernorm,
        gather_tokens,
        jepa_loss,
        predictor_tokens,
    )

    driver.set_active(_Driver(arch))
    compiled: list[str] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(f"{self.fn.__name__} {sorted((k, v) for k, v in kwargs.items() if k.isupper())}")
        return kernel

    JITFunction.run = compile_only

    def use_triton(backend, *tensors):
        return backend != "reference"

    for mod in (adamw_tail, dispatch, ema, fp8_rows, gather_layernorm, gather_tokens, jepa_loss, predictor_tokens):
        if hasattr(mod, "use_triton"):
            mod.use_triton = use_triton
    return compiled


def cases():
    """(name, thunk) for every op, forward and backward, over sizes and dtypes."""
    import torch

    from ijepa_fast.kernels.adamw_tail import adamw_tail_
    from ijepa_fast.kernels.ema import ema_update_
    from ijepa_fast.kernels.fp8_rows import fp8_rows_
    from ijepa_fast.kernels.gather_layernorm import gather_layernorm
    from ijepa_fast.kernels.gather_tokens import gather_tokens, gather_tokens_packed
    from ijepa_fast.kernels.jepa_loss import jepa_loss
    from ijepa_fast.kernels.predictor_tokens import predictor_tokens, predictor_tokens_packed

    def r(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape).to(dtype).requires_grad_(grad)

    def backward(out, *inputs):
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    dtypes = (torch.float32, torch.bfloat16)
    widths = (80, 100, 768, 1280)  # multiples of 16 (aligned rows) and not
    for td in dtypes:
        for sd in dtypes:
            yield f"ema {td} <- {sd}", lambda td=td, sd=sd: ema_update_(
                [r(n, dtype=td) for n in (1, 80, 70001)] + [r(3, 1408, dtype=td)],
                [r(n, dtype=sd) for n in (1, 80, 70001)] + [r(3, 1408, dtype=sd)], 0.996, backend="triton")
    def tail(gd, cd, scale, found):
        sizes = (1, 80, 70001)
        ps = [r(n) for n in sizes]
        adamw_tail_(ps, [r(n, dtype=gd) for n in sizes[:2]] + [None], [r(n) for n in sizes],
                    [r(n).abs() for n in sizes],
                    [torch.tensor(1.0) for _ in sizes], lr=1e-3, weight_decay=0.04, betas=(0.9, 0.999), eps=1e-8,
                    computes=[r(n, dtype=cd) for n in sizes], targets=[r(n) for n in sizes],
                    target_computes=[r(n, dtype=cd) for n in sizes], momentum=0.996,
                    grad_scale=torch.tensor(0.5) if scale else None, found_inf=torch.zeros(()) if found else None,
                    backend="triton")
    for gd in dtypes:
        for cd in dtypes:
            for scale in (False, True):
                yield f"adamw_tail g={gd} c={cd} scale={scale}", lambda gd=gd, cd=cd, s=scale: tail(gd, cd, s, s)
    def fp8(found):
        shapes = ((3840, 1280), (1280, 5120), (7, 48))  # ViT-H's rows and an odd one
        weights = [r(*s) for s in shapes]
        fp8_rows_(weights, [torch.empty(s, dtype=torch.float8_e4m3fn) for s in shapes],
                  [torch.empty(s[0]) for s in shapes], found_inf=torch.zeros(()) if found else None,
                  backend="triton")
    for found in (False, True):
        yield f"fp8_rows found_inf={found}", lambda found=found: fp8(found)
    n = 20
    for dt in dtypes:
        for d in widths:
            for det in (False, True):
                def padded(dt=dt, d=d, det=det):
                    x = r(2, n, d, dtype=dt, grad=True)
                    idx = torch.randint(0, n, (4, 6))
                    lens = torch.tensor([6, 3, 0, 5])
                    for pos, ln in ((None, None), (r(n, d), None), (r(n, d), lens)):
                        backward(gather_tokens(x, idx, pos, lens=ln, deterministic=det, backend="triton"), x)

                def packed(dt=dt, d=d, det=det):
                    x = r(2, n, d, dtype=dt, grad=True)
                    cu = torch.tensor([0, 3, 3, 9, 12, 13], dtype=torch.int32)
                    out = gather_tokens_packed(x, torch.randint(0, n, (13,)), cu, r(n, d), deterministic=det,
                                               backend="triton")
                    backward(out, x)
                yield f"gather_tokens {dt} d={d} deterministic={det}", padded
                yield f"gather_tokens_packed {dt} d={d} deterministic={det}", packed
            yield f"gather_layernorm {dt} d={d}", lambda dt=dt, d=d: gather_layernorm(
                r(2, n, d, dtype=dt), torch.randint(0, n, (8, 5)), backend="triton")
            for k in (1, 4):
                def pred(dt=dt, d=d, k=k):
                    x, tok = r(2 * 3, 7, d, dtype=dt, grad=True), r(1, 1, d, grad=True)
                    out = predictor_tokens(x, torch.randint(0, n, (6, 7)), torch.randint(0, n, (k * 3, 4)), tok,
                                           r(n, d), k, backend="triton")
                    backward(out, x, tok)

                def pred_packed(dt=dt, d=d, k=k):
                    x, tok = r(9, d, dtype=dt, grad=True), r(1, 1, d, grad=True)
                    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
                    out = predictor_tokens_packed(x, torch.randint(0, n, (9,)), cu, torch.randint(0, n, (k * 3, 4)),
                                                  tok, r(n, d), k, backend="triton")
                    backward(out, x, tok)
                yield f"predictor_tokens {dt} d={d} k={k}", pred
                yield f"predictor_tokens_packed {dt} d={d} k={k}", pred_packed
            for kind in ("smooth_l1", "mse"):
                for valid in (False, True):
                    def loss(dt=dt, d=d, kind=kind, valid=valid):
                        p = r(8, 5, d, dtype=dt, grad=True)
                        v = torch.rand(8, 5) > 0.3 if valid else None
                        backward(jepa_loss(p, r(4, 5, d, dtype=dt), kind, v, repeat=2, num_targets=2,
                                           backend="triton"), p)
                    yield f"jepa_loss {dt} d={d} {kind} valid={valid}", loss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80 = A100, 90 = H100)")
    p.add_argument("--only", default="", help="only the cases whose name starts with this")
    args = p.parse_args()
    compiled = install(args.arch)
    failed = []
    for name, thunk in cases():
        if not name.startswith(args.only):
            continue
        try:
            thunk()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit code says it
            failed.append(name)
            print(f"FAILED {name}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}", file=sys.stderr)
            traceback.print_exc(limit=-3, file=sys.stderr)
    for line in sorted(set(compiled)):
        print("compiled", line)
    print(f"sm_{args.arch}: {len(set(compiled))} kernel variants compiled, {len(failed)} launches failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
