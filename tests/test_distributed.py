"""Several processes on the CPU (gloo): DDP and FSDP against one process, preemption, kills, NaNs."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_cli

# a small, well-conditioned run: Adam's eps is raised so that gradients that are pure rounding
# noise (the attention key bias's) do not turn into full-size updates that differ by summation order
TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pred_depth=1", "model.pred_dim=16",
        "data.demo_images=64", "optim.epochs=2", "optim.warmup=0.5", "optim.eps=1e-3", "run.progress=false",
        "run.plot=false", "run.log_every=1", "run.monitor_every=0", "mask.sampler=python"]


def torchrun(nproc, *args, cwd=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(random.randint(20000, 40000)), "-m", "ijepa_fast", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def weights(path):
    from ijepa_fast.checkpoint.format import consolidate
    from ijepa_fast.checkpoint.run_files import is_sharded

    ckpt = consolidate(path) if is_sharded(path) else torch.load(path, weights_only=True)
    return {f"{part}.{k}": v for part in ("encoder", "predictor", "target_encoder") for k, v in ckpt[part].items()}


def assert_close_weights(a, b, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k].double() - b[k].double()).norm() / (b[k].double().norm() + 1e-12)
        assert err <= rtol, f"{k}: relative difference {err:.2e}"


def losses(run_dir):
    import json

    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    run_cli("train", "--run-dir", d / "run", "--steps", "5", "data.batch_size=8", *TINY)
    return d / "run"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    torchrun(2, "train", "--run-dir", d / "run", "--steps", "5", "data.batch_size=4", *TINY)
    return d / "run"


def test_distributed_two_ranks_equal_one_rank_same_global_batch(one_process, ddp_run):
    assert (ddp_run / "train.log").read_text().count("global batch 8 = 4 x 2 process(es);") == 1  # described once
    for a, b in zip(losses(ddp_run), losses(one_process)):
        assert a == pytest.approx(b, rel=1e-5)
    assert_close_weights(weights(ddp_run / "jepa-latest.pth.tar"), weights(one_process / "jepa-latest.pth.tar"))


def test_distributed_accumulation_under_ddp_equals_one_process(one_process, tmp_path):
    """fp32: 2 ranks x 2 micro-batches of 2 images equal one process with the batch of 8."""
    torchrun(2, "train", "--run-dir", tmp_path / "acc", "--steps", "5", "data.batch_size=4", "optim.accum_steps=2",
             *TINY)
    for a, b in zip(losses(tmp_path / "acc"), losses(one_process)):
        assert a == pytest.approx(b, rel=1e-5)
    assert_close_weights(weights(tmp_path / "acc" / "jepa-latest.pth.tar"),
                         weights(one_process / "jepa-latest.pth.tar"))


def _initial_weights(tmp_path):
    from ijepa_fast.config import load_config
    from ijepa_fast.training.trainer import Trainer

    t = Trainer(load_config("demo_cpu", TINY + ["data.batch_size=8", f"run.dir={tmp_path / 'init'}"]))
    return {f"{part}.module.{k}": v.clone() for part in ("encoder", "predictor", "target_encoder")
            for k, v in getattr(t.model, part).state_dict().items()}


def _update_error(a: dict, b: dict, start: dict) -> float:
    """||(a - start) - (b - start)|| / ||b - start|| over every weight: how far apart two runs' updates are."""
    da = torch.cat([(a[k] - start[k]).double().flatten() for k in start])
    db = torch.cat([(b[k] - start[k]).double().flatten() for k in start])
    return float((da - db).norm() / db.norm())


def test_distributed_bf16_weights_under_ddp_equal_one_process(one_process, tmp_path):
    """perf.bf16_weights on 2 gloo ranks (and with 2 micro-batches each) against one process with the
    full batch: the weight updates after 5 steps agree within 0.5 % (measured 0.05 % and 0.16 %), as
    close as the bf16 step itself is to fp32 (measured 0.17 %)."""
    bf16 = ["perf.bf16_weights=true", *TINY]
    run_cli("train", "--run-dir", tmp_path / "one", "--steps", "5", "data.batch_size=8", *bf16)
    torchrun(2, "train", "--run-dir", tmp_path / "ddp", "--steps", "5", "data.batch_size=4", *bf16)
    torchrun(2, "train", "--run-dir", tmp_path / "acc", "--steps", "5", "data.batch_size=4", "optim.accum_steps=2",
             *bf16)
    assert "averaged in fp32" in (tmp_path / "ddp" / "train.log").read_text()
    start = _initial_weights(tmp_path)
    one = weights(tmp_path / "one" / "jepa-latest.pth.tar")
    fp32 = weights(one_process / "jepa-latest.pth.tar")
    assert _update_error(weights(tmp_path / "ddp" / "jepa-latest.pth.tar"), one, start) < 0.005
    assert _update_error(weights(tmp_path / "acc" / "jepa-latest.pth.tar"), one, start) < 0.005
    assert 1e-4 < _update_error(one, fp32, start) < 0.01  # the bf16 step differs from fp32, but little


def test_distributed_fused_tail_under_ddp_equals_one_process(tmp_path):
    """The fused AdamW + EMA tail (what perf.optimizer=auto takes on CUDA with bf16 weights, DDP
    included) on 2 gloo ranks, and over 2 micro-batches, against one process with the full batch; and
    one process with the tail against torch's AdamW: the weight updates after 5 steps agree as the
    bf16-weight runs do."""
    tail = ["perf.bf16_weights=true", "perf.optimizer=fused_tail", *TINY]
    run_cli("train", "--run-dir", tmp_path / "one", "--steps", "5", "data.batch_size=8", *tail)
    run_cli("train", "--run-dir", tmp_path / "torch", "--steps", "5", "data.batch_size=8", "perf.bf16_weights=true",
            *TINY)
    torchrun(2, "train", "--run-dir", tmp_path / "ddp", "--steps", "5", "data.batch_size=4", *tail)
    run_cli("train", "--run-dir", tmp_path / "acc", "--steps", "5", "data.batch_size=8", "optim.accum_steps=2", *tail)
    for run in ("one", "ddp", "acc"):
        assert "optimiser fused_tail" in (tmp_path / run / "train.log").read_text(), run
    start = _initial_weights(tmp_path)
    one = weights(tmp_path / "one" / "jepa-latest.pth.tar")
    assert _update_error(one, weights(tmp_path / "torch" / "jepa-latest.pth.tar"), start) < 1e-5
    assert _update_error(weights(tmp_path / "ddp" / "jepa-latest.pth.tar"), one, start) < 0.005
    assert _update_error(weights(tmp_path / "acc" / "jepa-latest.pth.tar"), one, start) < 0.005  # 2 micro-batches
    for a, b in zip(losses(tmp_path / "ddp"), losses(tmp_path / "one")):
        assert a == pytest.approx(b, rel=1e-3)


REDUCE_WORKER = """
import sys, torch
from ijepa_fast.config import load_config
from ijepa_fast.training.trainer import Trainer
t = Trainer(load_config("demo_cpu", sys.argv[1:]))
name = "predictor.predictor_blocks.0.mlp.fc1.bias"
value = 1.0 if t.rank == 0 else 2.0 ** -9
dict(t.run_model.named_parameters())[name].register_hook(lambda g: torch.full_like(g, value))
master, seen, real = dict(t.model.named_parameters())[name], [], t.optimizer.step
t.optimizer.step = lambda *a, **k: (seen.append(master.grad.clone()), real(*a, **k))[1]
t._one_step(next(iter(t.make_loader(1))))
with open(f"{t.run_dir}/reduced_r{t.rank}.txt", "w") as f:  # rank > 0 may not print
    f.write(f"{float(seen[0][0])!r} {bool((seen[0] == seen[0][0]).all())}")
"""


def test_distributed_bf16_weights_reduce_gradients_in_fp32(tmp_path):
    """Two ranks whose gradients are 1 and 2^-9: the fp32 masters receive their exact mean,
    0.5009765625 (averaging in bf16, as DDP over the bf16 compute copy would, gives 0.5)."""
    script = tmp_path / "worker.py"
    script.write_text(REDUCE_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(random.randint(20000, 40000)), str(script), "data.batch_size=4", "perf.bf16_weights=true",
           f"run.dir={tmp_path / 'run'}", *TINY]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / "run" / f"reduced_r{rank}.txt").read_text() == "0.5009765625 True"


def test_distributed_fsdp_equals_ddp_and_sharded_checkpoint_loads_at_one_rank(one_process, ddp_run, tmp_path):
    torchrun(2, "train", "--run-dir", tmp_path / "fsdp", "--steps", "5", "data.batch_size=4", "dist.strategy=fsdp",
             *TINY)
    latest = tmp_path / "fsdp" / "jepa-latest.dcp"
    assert latest.is_file() and (tmp_path / "fsdp" / latest.read_text().strip()).is_dir()
    for a, b in zip(losses(tmp_path / "fsdp"), losses(ddp_run)):
        assert a == pytest.approx(b, rel=1e-5)
    assert_close_weights(weights(latest), weights(ddp_run / "jepa-latest.pth.tar"))
    # the 2-rank sharded checkpoint resumes in one process (another world size) and goes on
    p = run_cli("train", "--run-dir", tmp_path / "one", "--steps", "7", "data.batch_size=8",
                f"run.resume={latest}", *TINY)
    assert "at step 5" in p.stderr
    assert torch.load(tmp_path / "one" / "jepa-latest.pth.tar", weights_only=True)["ijepa_fast"]["step"] == 7


def test_resume_after_sigkill_at_a_random_step_matches_an_uninterrupted_run(tmp_path):
    args = ["--steps", "12", "data.batch_size=8", "run.checkpoint_every=1", *TINY]
    run_cli("train", "--run-dir", tmp_path / "straight", *args)
    proc = subprocess.Popen([sys.executable, "-m", "ijepa_fast", "train", "--run-dir", str(tmp_path / "killed"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.Random().randint(2, 9)
    deadline = time.time() + 300
    metrics = tmp_path / "killed" / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = run_cli("train", "--run-dir", tmp_path / "killed", *args)
    assert "resumed from" in p.stderr
    a = weights(tmp_path / "straight" / "jepa-latest.pth.tar")
    b = weights(tmp_path / "killed" / "jepa-latest.pth.tar")
    assert all(torch.equal(a[k], b[k]) for k in a), "killed and resumed run differs from the uninterrupted one"
    steps = sorted((tmp_path / "killed").glob("jepa-step*.pth.tar"))
    assert len(steps) == 2  # run.keep_last


def test_resume_sigterm_writes_a_loadable_checkpoint_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ijepa_fast", "train", "--run-dir", str(tmp_path / "run"),
                             "--steps", "200", "data.batch_size=8", "run.checkpoint_every=1000", *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]  # a stopped run, told apart from a finished one (0)
    assert "SIGTERM: checkpoint at step" in err
    assert f"To resume: ijepa-fast train --run-dir {tmp_path / 'run'}" in err  # the exact command, folder included
    ckpt = torch.load(tmp_path / "run" / "jepa-latest.pth.tar", weights_only=True)
    step = ckpt["ijepa_fast"]["step"]
    assert 3 <= step < 200
    p = run_cli("train", "--run-dir", tmp_path / "run", "--steps", str(step + 2), "data.batch_size=8",
                "run.checkpoint_every=1000", *TINY)
    assert f"at step {step}" in p.stderr


def _nan_trainer(tmp_path, policy, nan_steps):
    from ijepa_fast.config import load_config
    from ijepa_fast.training.trainer import Trainer

    cfg = load_config("demo_cpu", TINY + ["data.batch_size=8", "run.checkpoint_every=2", f"run.dir={tmp_path}",
                                          f"optim.on_nonfinite={policy}", "run.max_steps=8"])
    trainer = Trainer(cfg)
    real = trainer.model.loss

    def loss(images, masks, return_outputs=False):
        out = real(images, masks)
        return out * float("nan") if trainer.step in nan_steps and torch.is_grad_enabled() else out

    trainer.model.loss = loss
    return trainer


def test_distributed_injected_nan_stops_cleanly_with_the_last_good_checkpoint(tmp_path):
    from ijepa_fast.training.trainer import TrainingStopped

    trainer = _nan_trainer(tmp_path, "stop", {5})
    with pytest.raises(TrainingStopped, match="loss is nan at step 5"):
        trainer.run()
    ckpt = torch.load(tmp_path / "jepa-latest.pth.tar", weights_only=True)
    assert ckpt["ijepa_fast"]["step"] == 4  # the last good one, intact
    assert not list(tmp_path.glob("jepa-step*0006*"))


def test_distributed_nonfinite_gradient_stops_cleanly_with_the_last_good_checkpoint(tmp_path):
    """A finite loss with an infinite gradient is stopped like a NaN loss, before any update."""
    from ijepa_fast.training.trainer import TrainingStopped

    trainer = _nan_trainer(tmp_path, "stop", set())
    param = trainer.model.predictor.predictor_blocks[0].mlp.fc1.weight
    param.register_hook(lambda g: g * float("inf") if trainer.step == 5 else g)
    with pytest.raises(TrainingStopped, match="a gradient is not finite at step 5"):
        trainer.run()
    ckpt = torch.load(tmp_path / "jepa-latest.pth.tar", weights_only=True)
    assert ckpt["ijepa_fast"]["step"] == 4
    assert torch.isfinite(ckpt["predictor"]["module.predictor_blocks.0.mlp.fc1.weight"]).all()


def test_distributed_skip_policy_skips_nonfinite_steps(tmp_path):
    trainer = _nan_trainer(tmp_path, "skip", {3, 4})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    ckpt = torch.load(tmp_path / "jepa-latest.pth.tar", weights_only=True)
    assert ckpt["ijepa_fast"]["step"] == 8
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert "step skipped (optim.on_nonfinite=skip; 2 in a row)" in (tmp_path / "train.log").read_text()


def test_distributed_launch_environment_parsing(monkeypatch):
    from ijepa_fast.training.distributed import first_host, read_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR"):
        monkeypatch.delenv(k, raising=False)
    assert read_env().world == 1
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[012-015,020]")
    env = read_env()
    assert (env.rank, env.world, env.local_rank, env.launcher) == (5, 16, 1, "srun")
    assert os.environ["MASTER_ADDR"] == "gpu012"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert read_env().launcher == "torchrun" and read_env().rank == 3
    assert first_host("node7") == "node7" and first_host("a[1,3],b2") == "a1"


def test_distributed_sharded_checkpoint_exports_and_extracts(tmp_path):
    torchrun(2, "train", "--run-dir", tmp_path / "fsdp", "--steps", "2", "data.batch_size=4", "dist.strategy=fsdp",
             *TINY)
    run_cli("export", tmp_path / "fsdp" / "jepa-latest.dcp", tmp_path / "enc.safetensors")
    from safetensors.torch import load_file

    from ijepa_fast.checkpoint.format import encoder_from_checkpoint

    state = load_file(str(tmp_path / "enc.safetensors"))
    enc = encoder_from_checkpoint(tmp_path / "fsdp" / "jepa-latest.dcp")
    assert torch.equal(state["norm.weight"], enc.norm.weight) and enc.embed_dim == 32
