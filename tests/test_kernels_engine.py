"""The engine with every fused op on its Triton kernel: the golden step, whole losses and gradients
against the reference ops (padded and packed), and the kernel benchmark script."""
import torch
from conftest import DEVICE
from kernel_checks import needs_triton, rand

pytestmark = needs_triton


def test_kernel_golden_step_reference_with_kernels_forced_on():
    """The reference's golden step, with every fused op running its Triton kernel."""
    from test_reference_golden import PAIRS, compare, run_golden_step

    for p in PAIRS:
        gold, out = run_golden_step(*p.values, attn="math", kernels="triton", device=DEVICE)
        bad = compare(gold, out)
        assert not bad, "golden step with kernels differs:\n" + "\n".join(bad)


def test_kernel_engine_step_matches_reference_path_with_padding():
    """A default-mode (padded) batch: the whole loss and every gradient, kernels vs references."""
    from ijepa_fast.config import MaskConfig
    from ijepa_fast.masks import MultiBlockSampler
    from ijepa_fast.model import IJEPA

    torch.manual_seed(0)
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=24, embed_dim=48, depth=1,
                        num_heads=3, attn="math").to(DEVICE)
    sampler = MultiBlockSampler(model.grid, MaskConfig(min_keep=4, num_context=2), seed=1)
    masks = next(mb for mb in (sampler.sample(3, s) for s in range(40)) if mb.context_lens is not None).to(DEVICE)
    images = rand(3, 3, 32, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for backend in ("reference", "triton"):
        model.configure_kernels(backend)
        loss = model.loss(images, masks)
        results[backend] = (loss, torch.autograd.grad(loss, params))
    (l_ref, g_ref), (l_tri, g_tri) = results["reference"], results["triton"]
    torch.testing.assert_close(l_tri, l_ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kernel_benchmark_script_runs_every_case(tmp_path):
    """bench_kernels.py stays runnable: every op and provider once, on tiny sizes."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "k.jsonl"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_kernels.py"), "--device", DEVICE, "--models",
                        "tiny", "--repeats", "1", "--out", str(out), "--md", str(tmp_path / "k.md")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ops = {(r["op"], r["provider"]) for r in rows if r["bench"] == "kernels"}
    for op in ("ema", "gather_tokens fwd", "gather_tokens bwd", "gather_layernorm", "predictor_tokens fwd",
               "predictor_tokens bwd", "jepa_loss fwd+bwd"):
        assert (op, "triton") in ops
    assert "| model | op |" in (tmp_path / "k.md").read_text()


def test_kernel_packed_engine_step_matches_references():
    from ijepa_fast.config import MaskConfig
    from ijepa_fast.masks import MultiBlockSampler
    from ijepa_fast.model import IJEPA

    torch.manual_seed(0)
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=24, embed_dim=48, depth=1,
                        num_heads=3, attn="math").to(DEVICE).configure_layout("packed", "math")
    masks = MultiBlockSampler(model.grid, MaskConfig(min_keep=4), seed=2).sample(3, 5).to(DEVICE)
    images = rand(3, 3, 32, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    res = {}
    for backend in ("reference", "triton"):
        loss = model.configure_kernels(backend).loss(images, masks)
        res[backend] = (loss, torch.autograd.grad(loss, params))
    torch.testing.assert_close(res["triton"][0], res["reference"][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(res["triton"][1], res["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
