"""The command line, end to end, as a user runs it."""
import json

import torch
from conftest import run_cli


def test_cli_demo_trains_end_to_end(tmp_path):
    """The built-in demo: no config, no data; a run folder with log, plot and checkpoint; the loss falls."""
    proc = run_cli("train", "--steps", "40", "run.log_every=2", cwd=tmp_path)
    run_dir = next((tmp_path / "runs").iterdir())
    assert f"run folder: {run_dir.relative_to(tmp_path)}" in proc.stdout
    for name in ("config.yaml", "train.log", "metrics.jsonl", "metrics.csv", "loss.png", "jepa-latest.pth.tar"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 41, 2))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, f"loss did not fall: {first} -> {last}"
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(run_dir / "jepa-latest.pth.tar", weights_only=True)
    assert ckpt["ijepa_fast"]["step"] == 40 and all(k.startswith("module.") for k in ckpt["encoder"])
    assert "demo" in (run_dir / "config.yaml").read_text()


def test_cli_trains_on_an_image_folder(tmp_path):
    from PIL import Image

    for c in ("cats", "dogs"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (50, 40), (i * 20, 80, 160)).save(tmp_path / "data" / c / f"{i}.jpg")
    proc = run_cli("train", "--data", tmp_path / "data", "--run-dir", tmp_path / "run", "--steps", "2",
                   "data.batch_size=8", "run.progress=false", "data.num_workers=1")
    assert "20 images" in proc.stderr and (tmp_path / "run" / "jepa-latest.pth.tar").exists()


def test_cli_errors_name_what_to_fix(tmp_path):
    p = run_cli("train", "optim.lrr=1", check=False, cwd=tmp_path)
    assert p.returncode == 2 and "unknown config key 'optim.lrr'" in p.stderr and "did you mean 'lr'" in p.stderr
    p = run_cli("train", "in1k_vith14_ep300", check=False, cwd=tmp_path)
    assert p.returncode == 2 and "data.path is not set" in p.stderr
    p = run_cli("train", "--data", tmp_path / "nothing", check=False, cwd=tmp_path)
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = run_cli("train", "no_such_config", check=False, cwd=tmp_path)
    assert p.returncode == 2 and "not found" in p.stderr


def test_cli_config_describe_list_and_resolved(tmp_path):
    out = run_cli("config", "--describe").stdout
    assert "optim.lr" in out and "mask.mode" in out
    assert "'auto' (packed when a fused variable-length attention kernel runs" in out  # what runs, on any device
    assert "in1k_vith14_ep300" in run_cli("config", "--list").stdout
    resolved = run_cli("config", "in22k_vitg16_ep44", "optim.lr=3e-4").stdout
    assert "name: vit_giant" in resolved and "lr: 0.0003" in resolved


def test_cli_export_safetensors(tmp_path):
    run_cli("train", "--steps", "1", "--run-dir", tmp_path / "run", "run.progress=false", "run.plot=false")
    run_cli("export", tmp_path / "run" / "jepa-latest.pth.tar", tmp_path / "enc.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "enc.safetensors"))
    ckpt = torch.load(tmp_path / "run" / "jepa-latest.pth.tar", weights_only=True)
    assert torch.equal(state["norm.weight"], ckpt["target_encoder"]["module.norm.weight"])


def test_cli_overrides_may_follow_options(tmp_path):
    out = run_cli("config", "demo_cpu", "--data", tmp_path, "optim.lr=5e-4", "data.batch_size=16").stdout
    assert "lr: 0.0005" in out and "batch_size: 16" in out and str(tmp_path) in out
    p = run_cli("config", "demo_cpu", "--bogus", check=False)
    assert p.returncode == 2 and "unrecognized arguments: --bogus" in p.stderr
    p = run_cli("train", "mask.min_keep=40", "--run-dir", tmp_path / "never", check=False)
    assert p.returncode == 2 and "mask.min_keep=40" in p.stderr and not (tmp_path / "never").exists()


def test_cli_bench_smoke_on_cpu(tmp_path):
    """ijepa-fast bench runs end to end on the CPU (figures there mean nothing; the GPU run is the
    benchmark): both mask modes, fast paths on and off, one JSON object per line."""
    p = run_cli("bench", "--model", "vit_tiny", "--batch", "4", "--steps", "2", "--repeats", "1", "--device", "cpu",
                cwd=tmp_path)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [(r["masks"], r["perf"]) for r in rows] == [("reference", "defaults"), ("reference", "plain"),
                                                       ("default", "defaults"), ("default", "plain")]
    assert {(r["masks"], r["fast"]) for r in rows} == {("reference", False), ("reference", True), ("default", False),
                                                       ("default", True)}
    for r in rows:
        assert r["images_per_s"] > 0 and r["gflop_per_img"] > 0 and r["ctx_tokens_per_img"] > 0
    by = {(r["masks"], r["fast"]): r for r in rows}
    # on the CPU the fast path pads too: nested-tensor attention there costs more than padding
    assert by[("default", True)]["layout"] == "padded" and by[("default", False)]["layout"] == "padded"
    assert by[("reference", True)]["layout"] == "dense"
    assert by[("default", True)]["ctx_tokens_per_img"] > by[("reference", True)]["ctx_tokens_per_img"]


def test_device_errors_name_the_flag_or_the_config_key():
    """One device check for the commands' --device and the config's run.device; each error names
    what the user wrote, in the form they wrote it."""
    import pytest

    from ijepa_fast.errors import ConfigError
    from ijepa_fast.training.setup import resolve_device

    with pytest.raises(ConfigError, match=r"^--device 'banana' is not a device"):
        resolve_device("banana", setting="--device")
    with pytest.raises(ConfigError, match=r"^run.device='banana' is not a device"):
        resolve_device("banana")
    with pytest.raises(ConfigError, match=r"^run.device=meta: use cpu or cuda"):
        resolve_device("meta")
    assert resolve_device("cpu", setting="--device") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^--device cuda: CUDA is not available here; use --device cpu"):
            resolve_device("cuda", setting="--device")
        with pytest.raises(ConfigError, match=r"^run.device=cuda:1: CUDA is not available here; use run.device=cpu"):
            resolve_device("cuda:1")
        assert resolve_device("auto") == torch.device("cpu")
