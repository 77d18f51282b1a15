"""The command line never shows a traceback and never loses a run.

Each bad input runs as a user would run it (a subprocess) and must end with exit code 2, one
``error:`` line naming what to change, no traceback, no change to an existing run folder (every file
hashed before and after) and no new folder left behind.
"""
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_cli

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pred_depth=1", "model.pred_dim=16",
        "data.demo_images=64", "data.batch_size=8", "optim.epochs=2", "run.progress=false", "run.plot=false",
        "run.log_every=1", "run.monitor_every=0", "mask.sampler=python"]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """An existing run: 4 steps, a checkpoint every 2."""
    d = tmp_path_factory.mktemp("existing") / "run"
    run_cli("train", "--run-dir", d, "--steps", "4", "run.checkpoint_every=2", *TINY)
    return d


@pytest.fixture(scope="module")
def odd_width_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint in the published layout whose width (40) is no standard ViT's: its head count is unknown."""
    from ijepa_fast.checkpoint.format import add_prefix, save_atomic
    from ijepa_fast.model import IJEPA

    m = IJEPA.build("custom", img_size=32, patch_size=8, pred_depth=1, pred_dim=16, embed_dim=40, depth=2, num_heads=4)
    path = tmp_path_factory.mktemp("published") / "odd.pth.tar"
    save_atomic({part: add_prefix(getattr(m, part).state_dict()) for part in ("encoder", "predictor", "target_encoder")}
                | {"opt": None, "epoch": 1}, path)
    return path


def expect_user_error(args, fragment: str, tmp_path: Path, keep: Path | None = None) -> str:
    """Run ``ijepa-fast ARGS`` in a scratch folder and check the rule; returns the error line."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    before = snapshot(keep) if keep else None
    p = run_cli(*args, cwd=cwd, check=False)
    assert p.returncode == 2, f"exit {p.returncode}: {p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], p.stderr[-2000:]
    assert not list(cwd.iterdir()), f"left behind: {list(cwd.iterdir())}"
    if keep:
        assert snapshot(keep) == before, "a failed command changed the run folder"
    return errors[0]


BAD_VALUES = [
    (["optim.lr=-1"], "optim.lr: must be positive"),
    (["optim.lr=nan"], "optim.lr: nan is not a finite number"),
    (["optim.eps=-1"], "optim.eps: must be positive"),
    (["optim.betas=[2,3]"], "optim.betas: each must be in [0, 1)"),
    (["optim.weight_decay=-1"], "optim.weight_decay: must be 0 or more"),
    (["data.num_workers=-1"], "data.num_workers: must be 0"),
    (["model.patch_size=0"], "model.patch_size: must be at least 1"),
    (["model.embed_dim=128", "model.num_heads=5"], "model.num_heads: 5 does not divide model.embed_dim=128"),
    (["model.depth=0"], "model.depth: must be at least 1"),
    (["data.crop_size=0"], "data.crop_size: must be positive"),
    (["run.keep_last=0"], "run.keep_last: must be at least 1"),
    (["mask.target_aspect=[0,1]"], "mask.target_aspect"),
    (["--steps", "0"], "--steps: must be at least 1"),
    (["extra_config", "another"], "unexpected argument 'another'"),
]


@pytest.mark.parametrize("args,fragment", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_cli_bad_value_is_one_line_before_any_work(args, fragment, tmp_path):
    cfg_args = [a for a in args if a != "extra_config"]
    extra = ["demo_cpu"] if "extra_config" in args else []
    expect_user_error(["train", *extra, *TINY, *cfg_args], fragment, tmp_path)


def test_cli_failed_resume_changes_nothing(run, tmp_path):
    """A resume that cannot load (another depth) leaves config.yaml and the checkpoints as they were."""
    expect_user_error(["train", "--run-dir", run, "--steps", "6", *TINY, "model.depth=3"],
                      "encoder does not match the checkpoint", tmp_path, keep=run)


def test_cli_resume_with_changed_settings_keeps_the_history(run, tmp_path):
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    first = (copy / "config.yaml").read_text()
    p = run_cli("train", "--run-dir", copy, "--steps", "6", "run.checkpoint_every=2", *TINY, "optim.epochs=3")
    assert "resumed with changed settings: optim.epochs" in p.stderr
    assert (copy / "config.yaml").read_text() == first  # as first written
    history = (copy / "config_history.yaml").read_text()
    assert "optim.epochs:\n  - 2\n  - 3" in history and "step: 4" in history


def test_cli_resume_from_an_empty_file_says_so(tmp_path):
    empty = tmp_path / "empty.pth.tar"
    empty.write_bytes(b"")
    expect_user_error(["train", "--run-dir", tmp_path / "cwd" / "new", *TINY, f"run.resume={empty}"],
                      "the file is empty (0 bytes)", tmp_path)


def test_cli_torn_latest_falls_back_to_the_newest_readable_checkpoint(run, tmp_path):
    copy = tmp_path / "run"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    latest = copy / "jepa-latest.pth.tar"
    latest.unlink()
    latest.write_bytes(b"PK\x03\x04 torn")  # a torn file where the link was
    p = run_cli("train", "--run-dir", copy, "--steps", "6", "run.checkpoint_every=2", *TINY)
    assert "resuming from the newest readable checkpoint" in p.stderr and "at step 4" in p.stderr
    assert torch.load(copy / "jepa-latest.pth.tar", weights_only=True)["ijepa_fast"]["step"] == 6


def _mount(kind: str, where: Path):
    where.mkdir(parents=True)
    opts = {"full": "size=64k", "readonly": "size=1m,ro"}[kind]
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small file system here ({p.stderr.strip() or 'not permitted'})")


def _umount(where: Path):
    subprocess.run(["umount", str(where)], capture_output=True)


@pytest.mark.skipif(os.name != "posix", reason="mount is POSIX")
def test_cli_read_only_and_full_run_folders_fail_before_training(tmp_path):
    ro, full = tmp_path / "ro", tmp_path / "full"
    _mount("readonly", ro)
    try:
        expect_user_error(["train", "--run-dir", ro / "run", *TINY], "cannot write to the run folder", tmp_path)
        _mount("full", full)
        try:
            expect_user_error(["train", "--run-dir", full / "run", *TINY], "MiB free, but a checkpoint of this model",
                              tmp_path)
            assert not (full / "run").exists()  # the folder it made is gone again
        finally:
            _umount(full)
    finally:
        _umount(ro)


def test_cli_export_and_extract_name_the_head_count_option(odd_width_checkpoint, tmp_path):
    line = expect_user_error(["export", odd_width_checkpoint, tmp_path / "cwd" / "out.safetensors"], "--num-heads N",
                             tmp_path)
    assert "not a standard ViT size" in line
    out = tmp_path / "enc.safetensors"
    run_cli("export", odd_width_checkpoint, out, "--num-heads", "4")
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["num_heads"] == "4"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _image_folder(root: Path, n=8):
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n // 2):
            Image.new("RGB", (40, 40), (i * 30, 60 if c == "a" else 200, 90)).save(root / c / f"{i}.png")
    return root


def test_cli_extract_runs_at_the_checkpoint_resolution_and_probe_checks_its_inputs(run, tmp_path):
    data = _image_folder(tmp_path / "imgs")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run_cli("extract", run / "jepa-latest.pth.tar", "--data", data, "--out", a)
    from ijepa_fast.eval import load

    feats = load(a)
    assert feats.meta["img"] == 32 and feats.features.shape == (8, 32)  # the demo model trained at 32 px
    assert a.stat().st_mode & 0o777 == 0o666 & ~_umask()
    expect_user_error(["extract", run / "jepa-latest.pth.tar", "--data", data, "--out", tmp_path / "f.txt"],
                      "--out", tmp_path)
    # val features of another width: an error; of another resolution: a warning
    wide = load(a)
    wide.features = torch.cat([wide.features, wide.features], 1)
    from ijepa_fast.eval import save

    save(wide, b)
    expect_user_error(["probe", "knn", "--train", a, "--val", b], "train features are 32 wide but val features 64",
                      tmp_path)
    run_cli("extract", run / "jepa-latest.pth.tar", "--data", data, "--out", b, "--img", "48", "--force")  # b exists
    p = run_cli("probe", "knn", "--train", a, "--val", b, "--k", "3")
    assert "extracted at 32 px and val features at 48 px" in p.stderr
    res = json.loads(p.stdout.splitlines()[-1])
    assert all(len(repr(v).split(".")[-1]) <= 4 for v in res.values() if isinstance(v, float))  # no float32 noise
    expect_user_error(["probe", "lowshot", "--train", a, "--val", b], "lowshot needs --per-class N or --percent P",
                      tmp_path)


def test_cli_metrics_have_gradient_norm_and_memory(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in rows)
    assert all(r["mem_gib"] > 0 for r in rows)  # on the CPU: the process's peak resident memory


def test_cli_bench_names_a_bad_perf_setting(tmp_path):
    expect_user_error(["bench", "--model", "vit_tiny", "--device", "cpu", "--steps", "1", "--perf",
                       "optimizer=adam"], "perf.optimizer", tmp_path)
    expect_user_error(["bench", "--model", "vit_tiny", "--perf", "optimizer"], "KEY=VALUE", tmp_path)
