"""Evaluation: extraction, probes, low-shot sampling, collapse diagnostics, the CLI."""
import json

import pytest
import torch
from conftest import GOLDEN, run_cli
from PIL import Image

from ijepa_fast.checkpoint.format import encoder_from_checkpoint
from ijepa_fast.eval import (
    attentive_probe,
    collapse_stats,
    effective_rank,
    encode,
    knn_probe,
    linear_probe,
    lowshot,
    per_class,
    topk,
)


def test_eval_extraction_on_golden_checkpoint_equals_pooled_target_output():
    gold = torch.load(GOLDEN / "ref_step_tiny.pt", weights_only=False)
    enc = encoder_from_checkpoint(GOLDEN / "ref_ckpt_tiny.pth.tar", num_heads=gold["config"]["num_heads"])
    pooled, tokens = encode(enc.eval(), gold["images"], tokens=True)
    expected = gold["target_encoder_out"].mean(1)  # the target encoder (default), average-pooled
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokens, gold["target_encoder_out"], rtol=1e-5, atol=1e-6)
    ctx = encoder_from_checkpoint(GOLDEN / "ref_ckpt_tiny.pth.tar", "encoder", gold["config"]["num_heads"])
    assert not torch.allclose(encode(ctx.eval(), gold["images"])[0], expected)  # the other encoder differs


def test_eval_interpolation_exact_at_native_grid_and_other_resolutions_run():
    gold = torch.load(GOLDEN / "ref_step_tiny.pt", weights_only=False)
    enc = encoder_from_checkpoint(GOLDEN / "ref_ckpt_tiny.pth.tar", num_heads=4).eval()
    assert enc.pos_for(enc.grid) is enc.pos_embed  # native grid: the table itself
    big = torch.nn.functional.interpolate(gold["images"], scale_factor=2, mode="bilinear")
    pooled, tokens = encode(enc, big, tokens=True)
    assert tokens.shape == (4, 256, 64) and torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled, tokens.mean(1))  # average-pooled patch tokens
    assert not torch.allclose(pooled, encode(enc, gold["images"])[0])  # another resolution, other features


def clusters(n_per_class, classes=4, dim=32, seed=0, tokens=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 4
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    if tokens:  # tokens: noise everywhere, the class signal in one token of each image
        t = torch.randn(len(y), tokens, dim, generator=g)
        t[torch.arange(len(y)), torch.randint(0, tokens, (len(y),), generator=g)] += centres[y] * 2
        return t, y
    return x, y


def test_eval_probes_reach_near_perfect_accuracy_on_separable_data():
    tx, ty = clusters(60, seed=1)
    vx, vy = clusters(30, seed=1)
    vx = vx + 0.0 * torch.randn_like(vx)
    lin = linear_probe(tx, ty, vx, vy, epochs=30)
    knn = knn_probe(tx, ty, vx, vy, k=5)
    assert lin["top1"] >= 99.0 and knn["top1"] >= 99.0 and lin["top5"] == 100.0
    assert set(lin["sweep_heldout_top1"]) and lin["lr"] in lin["sweep_heldout_top1"]
    ttok, tty = clusters(40, tokens=6, seed=2)
    vtok, vty = clusters(20, tokens=6, seed=2)
    att = attentive_probe(ttok, tty, vtok, vty, lrs=(3e-3,), epochs=40)
    assert att["top1"] >= 95.0


def test_eval_probes_are_at_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    tx, vx = torch.randn(400, 16, generator=g), torch.randn(200, 16, generator=g)
    ty, vy = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (200,), generator=g)
    assert linear_probe(tx, ty, vx, vy, epochs=10, lr=0.1)["top1"] < 40.0


def test_eval_lowshot_picks_exactly_n_per_class():
    y = torch.tensor([0] * 30 + [1] * 12 + [2] * 50)
    for seed in range(3):
        idx = per_class(y, n=5, seed=seed)
        assert torch.bincount(y[idx]).tolist() == [5, 5, 5] and len(set(idx.tolist())) == 15
    assert per_class(y, n=5, seed=0).tolist() != per_class(y, n=5, seed=1).tolist()
    pct = per_class(y, percent=10, seed=0)
    assert torch.bincount(y[pct]).tolist() == [3, 1, 5]
    tx, ty = clusters(40, seed=3)
    vx, vy = clusters(20, seed=3)
    res = lowshot(tx, ty, vx, vy, n=2, seeds=(0, 1, 2), epochs=20)
    assert res["labels"] == 8 and len(res["runs"]) == 3 and res["top1"] > 90
    with pytest.raises(ValueError):
        per_class(y)


def test_eval_topk_and_collapse_diagnostics():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk(logits, torch.tensor([1, 2])) == (50.0, 100.0)  # k = min(5, 3 classes)
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(500, 32, generator=g)
    collapsed = torch.randn(500, 1, generator=g) @ torch.randn(1, 32, generator=g) + 1e-4 * spread
    assert effective_rank(spread) > 28 and effective_rank(collapsed) < 2
    assert collapse_stats(spread)["std_mean"] > 0.9 and collapse_stats(collapsed * 1e-3)["std_mean"] < 2e-3


def test_eval_cli_extract_and_probe(tmp_path):
    colours = [(220, 40, 40), (40, 200, 60), (50, 60, 220)]
    for split, n in (("train", 8), ("val", 4)):
        for c, col in enumerate(colours):
            d = tmp_path / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 40), tuple(min(255, v + 3 * i) for v in col)).save(d / f"{i}.png")
    run_cli("train", "--steps", "2", "--run-dir", tmp_path / "run", "run.progress=false", "run.plot=false")
    ckpt = tmp_path / "run" / "jepa-latest.pth.tar"
    p = run_cli("extract", ckpt, "--data", tmp_path / "data" / "train", "--img", "32", "--tokens", "--out",
                tmp_path / "train.safetensors", "--device", "cpu")
    assert "24 images (0 unusable, skipped)" in p.stdout
    run_cli("extract", ckpt, "--data", tmp_path / "data" / "val", "--img", "32", "--tokens", "--out",
            tmp_path / "val.npy", "--device", "cpu")
    from ijepa_fast.eval import load

    tr, va = load(tmp_path / "train.safetensors"), load(tmp_path / "val.npy")
    assert tr.features.shape == (24, 128) and tr.tokens.shape == (24, 64, 128) and va.labels.tolist()[:4] == [0] * 4
    assert tr.meta["classes"] == ["class0", "class1", "class2"] and tr.files[0].endswith("0.png")
    res = json.loads(run_cli("probe", "linear", "--train", tmp_path / "train.safetensors", "--val",
                             tmp_path / "val.npy", "--epochs", "20").stdout)
    assert res["top1"] == 100.0 and res["train_images"] == 24
    res = json.loads(run_cli("probe", "knn", "--data", tmp_path / "data", "--checkpoint", ckpt, "--img", "32",
                             "--device", "cpu", "--k", "3").stdout)
    assert res["top1"] == 100.0
    res = json.loads(run_cli("probe", "lowshot", "--train", tmp_path / "train.safetensors", "--val",
                             tmp_path / "val.npy", "--per-class", "2", "--epochs", "20").stdout)
    assert res["labels"] == 6 and len(res["runs"]) == 3
    res = json.loads(run_cli("probe", "attentive", "--train", tmp_path / "train.safetensors", "--val",
                             tmp_path / "val.npy").stdout)
    assert res["top1"] >= 90.0
