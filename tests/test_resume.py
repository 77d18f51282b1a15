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


def test_resume_from_the_reference_checkpoint_restarts_its_epoch(tmp_path):
    """`ijepa-fast train run.resume=PATH` on a checkpoint the reference implementation wrote (published
    layout, optimiser state included): it resumes at the start of the epoch after the saved one
    (epoch x iterations per epoch, as the reference does) and trains on to the end."""
    from test_reference_golden import TRAJ_PAIRS, traj_overrides

    assert TRAJ_PAIRS
    for pair in TRAJ_PAIRS:
        traj_file, ckpt_file = pair.values
        gold = torch.load(traj_file, weights_only=False)
        run = tmp_path / pair.id
        overrides = [o for o in traj_overrides(gold, ckpt_file, run) if not o.startswith("run.dir=")]
        end = len(gold["steps"])
        p = run_cli("train", "--run-dir", run, "--steps", end, *overrides)
        assert f"at step {gold['ckpt_step']} (epoch {gold['ckpt_epoch']:.2f})" in p.stderr
        ckpt = torch.load(run / "jepa-latest.pth.tar", weights_only=True)
        assert ckpt["ijepa_fast"]["step"] == end and ckpt["epoch"] == end // gold["optim"]["iterations_per_epoch"]
        ref = torch.load(ckpt_file, weights_only=True)
        moved = ckpt["encoder"]["module.blocks.0.attn.qkv.weight"] - ref["encoder"]["module.blocks.0.attn.qkv.weight"]
        assert moved.abs().max() > 0  # it trained on from the reference's weights
