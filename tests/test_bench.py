"""The step benchmark's report on made-up rows: spec-peak MFU, goals, GPU-hours, the table, and
the released step's stand-in collator drawing exactly the masks our bench times."""
import importlib.util
import random
import sys

import torch
from conftest import ROOT

from ijepa_fast.bench.report import (
    EQUAL_MASKS,
    SPEC_PEAK_TFLOPS,
    add_spec_mfu,
    evaluate_goals,
    gpu_hours,
    spec_peak,
    step_report,
)
from ijepa_fast.config import MaskConfig
from ijepa_fast.masks import MultiBlockSampler


def _ours(model, patch, batch, masks, ips, fp8=None, **kw):
    return {"bench": "step", "model": model, "patch": patch, "batch": batch, "masks": masks, "fast": True,
            "fp8": fp8, "images_per_s": ips, "step_ms": round(batch / ips * 1e3, 1), "gpu": "NVIDIA H200", **kw}


def _released(model, patch, batch, ips, masks=EQUAL_MASKS):
    return {"bench": "reference_step", "model": model, "patch": patch, "batch": batch, "variant": "released",
            "img_per_s": ips, "masks": masks, "step_ms": round(batch / ips * 1e3, 1), "peak_mem_gib": 50.0}


def test_spec_peak_and_mfu():
    assert spec_peak("NVIDIA H200") == spec_peak("NVIDIA H100 80GB HBM3") == 989.0
    assert spec_peak("Some Future GPU") is None and spec_peak(None) is None
    tflops = random.uniform(100, 900)
    row = add_spec_mfu({"gpu": "NVIDIA H200", "tflops": tflops, "mfu": 0.6})
    assert abs(row["mfu_spec"] - tflops / 989.0) < 1e-3 and row["spec_peak_tflops"] == 989.0
    unknown = add_spec_mfu({"gpu": "Some Future GPU", "tflops": tflops, "mfu": 0.6})
    assert "mfu_spec" not in unknown and unknown["mfu"] == 0.6  # only the in-run figure
    assert all(v > 0 for v in SPEC_PEAK_TFLOPS.values())


def test_gpu_hours_by_hand():
    ips = random.uniform(200, 900)
    hours = gpu_hours(ips, "vit_huge", 14)
    assert set(hours) == {"in1k_vith14_ep300", "in22k_vith14_ep66"}
    assert abs(hours["in1k_vith14_ep300"] - 300 * 1_281_167 / ips / 3600) < 0.06
    assert set(gpu_hours(ips, "vit_base", 16)) == {"in1k_vitb16"}  # StoP's I-JEPA ViT-B/16
    assert gpu_hours(ips, "vit_small", 16) == {}  # no published ViT-S recipe


def test_goals_met_not_met_not_measured():
    base_h, base_b = 275.0, 1065.0
    rows = [_ours("vit_huge", 14, 128, "reference", 2.3 * base_h, mfu=0.55, peak_mem_gib=28.0),
            _ours("vit_huge", 14, 128, "default", 1.7 * base_h),
            _ours("vit_base", 16, 256, "reference", 2.6 * base_b)]
    refs = [_released("vit_huge", 14, 128, base_h), _released("vit_base", 16, 256, base_b)]
    goals = {g["goal"]: g for g in evaluate_goals(rows, refs)}
    h_ref = goals["ViT-H/14 b128, reference masks, bf16"]
    assert h_ref["status"] == "met" and "2.30x" in h_ref["figure"] and "equal work" in h_ref["figure"]
    assert "not equal work" in goals["ViT-H/14 b128, default masks, bf16"]["figure"]
    assert goals["ViT-H/14 b128, default masks, bf16"]["status"] == "not met"  # 1.70x < 1.75x
    assert goals["ViT-B/16 b256, reference masks, bf16"]["status"] == "met"
    assert goals["ViT-H/14 b128, reference masks, FP8"]["status"] == "not measured"  # no FP8 row
    # fast enough but over the memory limit, or the MFU under it: not met
    for extra in ({"mfu": 0.55, "peak_mem_gib": 31.0}, {"mfu": 0.50, "peak_mem_gib": 28.0}):
        rows[0].update(extra)
        assert evaluate_goals(rows, refs)[0]["status"] == "not met"
    # no released row: not measured; only the released step's own masks: not equal work
    assert evaluate_goals(rows, [])[0]["status"] == "not measured"
    rows[0].update(mfu=0.55, peak_mem_gib=28.0)
    own = evaluate_goals(rows, [_released("vit_huge", 14, 128, base_h, masks="released collator")])[0]
    assert own["status"] == "met" and "not equal work" in own["figure"]


def test_step_report_table():
    rows = [_ours("vit_huge", 14, 128, "reference", 700.0, mfu=0.5, mfu_spec=0.4, tflops=395.6, peak_mem_gib=29.0,
                  ctx_tokens_per_img=68.7, torch="2.11", commit="abc1234", date="2026-12-01"),
            _ours("vit_huge", 14, 128, "reference", 770.0, fp8="rowwise")]
    text = step_report(rows, [_released("vit_huge", 14, 128, 280.0)], command="python x", peak=800.0)
    lines = [ln for ln in text.splitlines() if ln.startswith("| ViT-H/14 |")]
    assert len(lines) == 3  # released, ours bf16, ours FP8
    assert "equal work" in lines[0] and "1.00x" in lines[0]
    assert "2.50x" in lines[1] and "50.0%" in lines[1] and "40.0%" in lines[1]
    assert "FP8 rowwise" in lines[2] and "2.75x" in lines[2]
    assert "NVIDIA H200" in text and "989 TFLOP/s" in text and "(800 TFLOP/s)" in text
    fp8_goal = next(ln for ln in text.splitlines() if ln.startswith("| ViT-H/14 b128, reference masks, FP8"))
    assert "| met |" in fp8_goal
    assert "in1k_vith14_ep300" in text


def _load(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


def test_fp8_quality_gate():
    gate = _load("fp8_quality").gate
    bf16 = {"probe_target": random.uniform(80, 95), "probe_random": 70.0}
    assert gate(bf16, {**bf16, "probe_target": bf16["probe_target"] - 1.5}, 2.0)[0]
    assert gate(bf16, {**bf16, "probe_target": bf16["probe_target"] + 3.0}, 2.0)[0]  # better is fine
    assert not gate(bf16, {**bf16, "probe_target": bf16["probe_target"] - 2.5}, 2.0)[0]
    assert not gate({"probe_target": 71.0}, {"probe_target": 69.0, "probe_random": 70.0}, 5.0)[0]  # under random


def test_released_step_collator_draws_our_bench_masks():
    """benchmarks/reference_equal_work.py feeds the released step the masks ijepa_fast.bench.step times."""
    mod = _load("reference_equal_work")
    seed = random.randrange(1000)
    # the released script's collator arguments
    coll = mod.collator(seed)(input_size=(224, 224), patch_size=16, pred_mask_scale=(0.15, 0.2),
                              enc_mask_scale=(0.85, 1.0), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
                              allow_overlap=False, min_keep=10)
    ours = MultiBlockSampler((14, 14), MaskConfig(mode="reference"), seed=seed)  # as ijepa_fast.bench.step draws
    for step in range(3):
        _, enc, pred = coll([torch.zeros(1)] * 8)
        want = ours.sample(8, step)
        assert len(enc) == 1 and len(pred) == 4
        assert torch.equal(torch.stack(enc), want.context) and torch.equal(torch.stack(pred), want.targets)


def test_goal_takes_the_fastest_variant_that_passes_its_checks():
    """With several fast-path variants (``--perf``), the ViT-H goal is judged on the fastest row that
    also meets its MFU and memory bounds, and names the variant."""
    refs = [_released("vit_huge", 14, 128, 100.0)]
    fast_big = _ours("vit_huge", 14, 128, "reference", 260.0, mfu=0.6, peak_mem_gib=41.0, perf=["bf16_weights"])
    slower_small = _ours("vit_huge", 14, 128, "reference", 230.0, mfu=0.55, peak_mem_gib=28.0,
                         perf=["bf16_weights", "activation_checkpointing=selective"])
    slowest_small = _ours("vit_huge", 14, 128, "reference", 225.0, mfu=0.54, peak_mem_gib=20.0,
                          perf=["bf16_weights", "activation_checkpointing=full"])
    rows = [fast_big, slower_small, slowest_small]
    random.shuffle(rows)
    goal = evaluate_goals(rows, refs)[0]
    assert goal["status"] == "met" and "2.30x" in goal["figure"] and "selective" in goal["figure"], goal
    goal = evaluate_goals([fast_big], refs)[0]  # fast enough, but over 30 GiB
    assert goal["status"] == "not met" and "41.0 GiB" in goal["figure"], goal


def test_graph_rows_peak_is_the_reserved_pool_or_not_measured():
    """A CUDA-graph row whose peak was read as allocated memory (the captured pool is not counted on
    replay) does not pass a memory goal and shows as not measured; one that recorded the reserved
    memory is judged on it."""
    refs = [_released("vit_huge", 14, 128, 100.0)]
    graphs = {"cuda_graphs": True}
    old = _ours("vit_huge", 14, 128, "reference", 260.0, mfu=0.6, peak_mem_gib=14.0, perf_resolved=graphs)
    goal = evaluate_goals([old], refs)[0]
    assert goal["status"] == "not measured" and "peak_mem_gib not measured" in goal["figure"], goal
    page = step_report([old], refs, command="x")
    assert "not measured (graph pool)" in page and "| 14.0 |" not in page
    new = dict(old, peak_mem_gib=26.0, peak_mem_kind="reserved (CUDA graph pool)")
    goal = evaluate_goals([new], refs)[0]
    assert goal["status"] == "met" and "peak 26.0 GiB" in goal["figure"], goal
    assert "26.0 reserved" in step_report([new], refs, command="x")
    over = dict(new, peak_mem_gib=33.0)
    assert evaluate_goals([over], refs)[0]["status"] == "not met"


def test_bench_run_takes_perf_variants_on_the_cpu():
    """``BenchSpec.perf``: a fast-path variant (the fused tail, without host syncs) runs and is named
    in the row; its loss equals the plain foreach AdamW step's on the same masks and images."""
    from ijepa_fast.bench.step import BenchSpec, run

    base = dict(model="vit_tiny", patch=16, img=224, batch=2, pred_depth=1, mask_mode="reference", steps=2,
                warmup=1, device="cpu")
    tail = run(BenchSpec(**base, fast=True, perf={"optimizer": "fused_tail"}))
    plain = run(BenchSpec(**base, fast=True))
    assert tail["optimizer"] == "fused_tail" and "optimizer=fused_tail" in tail["perf"]
    assert plain["optimizer"] == "foreach"
    # no switch set: the row is the user's step, named so, with every switch resolved for the device
    assert plain["perf"] == "defaults" and tail["perf"] == ["optimizer=fused_tail"]
    assert plain["perf_resolved"]["preset"] == "fast" and "auto" not in plain["perf_resolved"].values()
    assert abs(tail["loss"] - plain["loss"]) < 1e-3 * abs(plain["loss"]) + 1e-6
    assert plain["precision"] == tail["precision"] == "fp32"  # the CPU's defaults: fp32 weights, no autocast
    bf16 = run(BenchSpec(**base, fast=True, perf={"bf16_weights": "true"}))
    assert bf16["precision"] == "bf16 weights"
    page = step_report([plain, bf16], [], command="x")
    assert "ijepa-fast, recipe as shipped (perf defaults), fp32 |" in page
    assert "ijepa-fast, bf16, bf16_weights=true |" in page
    import pytest

    from ijepa_fast.errors import ConfigError
    with pytest.raises(ConfigError, match="perf.optimizer"):
        run(BenchSpec(**base, fast=True, perf={"optimizer": "adam"}))
