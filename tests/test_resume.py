"""Resume equivalence: N steps straight == N/2 steps, a new process resumes, N/2 more (bit-exact on CPU)."""
import torch
from conftest import run_cli

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pred_depth=1", "model.pred_dim=16",
        "data.demo_images=48", "data.batch_size=8", "optim.epochs=3", "optim.warmup=1", "run.progress=false",
        "run.plot=false", "run.log_every=1", "run.checkpoint_every=5"]


def _states(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt, {k: ckpt[k] for k in ("encoder", "predictor", "target_encoder")}


def test_resume_is_bit_exact_mid_epoch(tmp_path):
    # 6 steps per epoch: 10 straight vs 5 + resume at step 5 (mid-epoch) + 5 more
    run_cli("train", "--run-dir", tmp_path / "straight", "--steps", "10", *TINY)
    run_cli("train", "--run-dir", tmp_path / "split", "--steps", "5", *TINY)
    ckpt5, _ = _states(tmp_path / "split" / "jepa-latest.pth.tar")
    assert ckpt5["ijepa_fast"]["step"] == 5 and ckpt5["ijepa_fast"]["data"] == {"epoch": 0, "batch": 5}
    assert ckpt5["ijepa_fast"]["sampler"]["step"] == 5  # the next masks drawn are step 5's
    p = run_cli("train", "--run-dir", tmp_path / "split", "--steps", "10", *TINY)
    assert "resumed from" in p.stderr and "at step 5" in p.stderr
    a, sa = _states(tmp_path / "straight" / "jepa-latest.pth.tar")
    b, sb = _states(tmp_path / "split" / "jepa-latest.pth.tar")
    for part in sa:
        for k in sa[part]:
            assert torch.equal(sa[part][k], sb[part][k]), f"{part}.{k} differs after resume"
    for i, st in a["opt"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], b["opt"]["state"][i]["exp_avg_sq"])
    # the metric logs agree too (the resumed run rewrote rows from step 5 on)
    log_a = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    log_b = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    import json
    la = [(r["step"], r["loss"]) for r in map(json.loads, log_a)]
    lb = [(r["step"], r["loss"]) for r in map(json.loads, log_b)]
    assert la == lb


def test_resume_from_published_checkpoint_restarts_its_epoch(tmp_path):
    run_cli("train", "--run-dir", tmp_path / "a", "--steps", "6", *TINY)
    ckpt = torch.load(tmp_path / "a" / "jepa-latest.pth.tar", weights_only=True)
    published = {k: v for k, v in ckpt.items() if k != "ijepa_fast"}  # the published layout only
    torch.save(published, tmp_path / "published.pth.tar")
    p = run_cli("train", "--run-dir", tmp_path / "b", "--steps", "8", f"run.resume={tmp_path / 'published.pth.tar'}",
                *TINY)
    assert "at step 6 (epoch 1.00)" in p.stderr
    assert torch.load(tmp_path / "b" / "jepa-latest.pth.tar", weights_only=True)["ijepa_fast"]["step"] == 8
