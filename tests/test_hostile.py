"""Hostile input against the ``ijepa-fast`` command: every case ends cleanly and changes nothing.

A table of cases, each with the command line, the exit status it must end with, a fragment of the
message it must print and the files that must stay as they were: every file of the shared scratch
world below (an existing run, image folders, feature files, checkpoints, configs) is hashed before
and after each case. Most cases run in this process through ``ijepa_fast.cli.main`` (fast); the
ones that need a real process (signals, a second writer) run as subprocesses, with a timeout.

A full disk is simulated by making the writer raise the error a full disk raises (ENOSPC, or
torch's "file write failed"); a place that cannot be written by a path under a regular file (the
tests run as root, for whom permission bits do not hold).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.pred_depth=1", "model.pred_dim=16",
        "data.demo_images=64", "data.batch_size=8", "optim.epochs=2", "run.progress=false", "run.plot=false",
        "run.log_every=1", "run.monitor_every=0", "mask.sampler=python"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


def cli(argv, capsys) -> tuple[int, str, str]:
    """``ijepa-fast ARGV`` in this process: (exit status, stdout, stderr); a hang fails after 120 s."""
    from ijepa_fast.cli import main

    def hang(signum, frame):
        raise TimeoutError(f"ijepa-fast {' '.join(map(str, argv))} hangs")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out, err = capsys.readouterr()
    return rc, out, err


def _images(root: Path, n: int = 4) -> Path:
    from PIL import Image

    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (i * 40, 60 if c == "a" else 200, 90)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Everything the cases read: an existing run (4 steps, a checkpoint every 2), image folders
    (good, all corrupt, a symlink loop), features, unreadable files, configs, existing outputs."""
    from ijepa_fast.cli import main

    w = tmp_path_factory.mktemp("world")
    assert main(["train", "--run-dir", str(w / "run"), "--steps", "4", "run.checkpoint_every=2", *TINY]) == 0
    ckpt = w / "run" / "jepa-latest.pth.tar"
    _images(w / "imgs")
    (w / "corrupt" / "c").mkdir(parents=True)
    for i in range(3):
        (w / "corrupt" / "c" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG" * (i + 1))
    (w / "corrupt" / "c" / "torn.png").write_bytes((w / "imgs" / "a" / "0.png").read_bytes()[:40])
    loop = w / "loop"
    _images(loop / "cls", 1)
    os.symlink("y", loop / "x")  # a two-link loop: x -> y -> x
    os.symlink("x", loop / "y")
    os.symlink("..", loop / "cls" / "a" / "back")  # a folder loop
    assert main(["extract", str(ckpt), "--data", str(w / "imgs"), "--out", str(w / "feats.safetensors"),
                 "--workers", "0"]) == 0
    assert main(["export", str(ckpt), str(w / "timm"), "--format", "timm"]) == 0
    (w / "junk.safetensors").write_text("not features\n")
    (w / "junk.pth.tar").write_bytes(b"PK\x03\x04 not a checkpoint" * 10)
    (w / "empty.pth.tar").write_bytes(b"")
    from fractions import Fraction

    torch.save({"encoder": {"x": Fraction(1, 2)}}, w / "pickled.pth.tar")  # an object: never unpickled
    (w / "latin1.yaml").write_bytes(b"optim:\n  lr: 0.001  # caf\xe9\n")
    (w / "dup.yaml").write_text("optim:\n  lr: 0.001\n  lr: 0.002\n")
    (w / "list.yaml").write_text("- optim\n- model\n")
    (w / "broken.yaml").write_text("optim: [0.001\n")
    (w / "exists.safetensors").write_bytes(b"an earlier output")
    (w / "exists.pth.tar").write_bytes(b"an earlier output")
    (w / "afile").write_text("a file, not a folder")
    return w


def _full_disk_safetensors(monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)


def _full_disk_torch(monkeypatch):
    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")  # what a full disk leaves mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1856 vs 1742: file write failed")
    monkeypatch.setattr(torch, "save", full)


RUN = ["train", "--run-dir", "{w}/run", *TINY]
NEW = ["train", "--run-dir", "{tmp}/new", *TINY]
CKPT = "{w}/run/jepa-latest.pth.tar"
FEATS = ["--train", "{w}/feats.safetensors", "--val", "{w}/feats.safetensors"]
EXTRACT = ["extract", CKPT, "--data", "{w}/imgs", "--workers", "0", "--out", "{tmp}/f.safetensors"]
BENCH = ["bench", "--model", "vit_tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--masks", "default",
         "--paths", "plain"]

# (id, argv, exit status, a fragment of the message, monkeypatch set-up or None)
CASES = [
    # a run folder is history
    ("restart-resume-null", [*RUN, "run.resume=null"], 2, "run.resume=null would start it over", None),
    ("restart-new-tag", [*RUN, "run.tag=other"], 2, "run.tag=other would start it over", None),
    ("rewind-older-checkpoint", [*RUN, "run.resume={w}/run/jepa-step00000002.pth.tar"], 2, "rewinding needs --force",
     None),
    ("foreign-checkpoint-into-a-run", [*RUN, "run.resume={w}/exists.pth.tar"], 2, "cannot read checkpoint", None),
    ("resume-a-folder", [*NEW, "run.resume={w}/run"], 2, "is a folder, not a checkpoint", None),
    ("resume-junk", [*NEW, "run.resume={w}/junk.pth.tar"], 2, "not a checkpoint file", None),
    ("resume-pickled-object", [*NEW, "run.resume={w}/pickled.pth.tar"], 2, "never unpickled here", None),
    ("resume-empty-file", [*NEW, "run.resume={w}/empty.pth.tar"], 2, "the file is empty", None),
    ("resume-missing", [*NEW, "run.resume={w}/nothing.pth.tar"], 2, "does not exist", None),
    ("resume-another-model", [*RUN, "model.depth=3"], 2, "encoder does not match the checkpoint", None),
    # values
    ("device-banana", [*NEW, "run.device=banana"], 2, "run.device", None),
    pytest.param("device-cuda", [*NEW, "run.device=cuda"], 2, "CUDA is not available", None, marks=NO_CUDA),
    pytest.param("device-cuda-7", [*NEW, "run.device=cuda:7"], 2, "CUDA is not available", None, marks=NO_CUDA),
    ("ipe-scale-tiny", [*NEW, "optim.ipe_scale=0.001"], 2, "optim.ipe_scale", None),
    ("warmup-longer-than-run", [*NEW, "optim.warmup=5"], 2, "optim.warmup", None),
    ("start-lr-10", [*NEW, "optim.start_lr=10"], 2, "optim.start_lr", None),
    ("lr-5", [*NEW, "optim.lr=5"], 2, "optim.lr", None),
    ("lr-text", [*NEW, "optim.lr=abc"], 2, "optim.lr: expected a number", None),
    ("mlp-ratio-tiny", [*NEW, "model.mlp_ratio=0.001"], 2, "model.mlp_ratio", None),
    ("num-targets-1000", [*NEW, "mask.num_targets=1000"], 2, "mask.num_targets", None),
    ("num-context-1000", [*NEW, "mask.num_context=1000"], 2, "mask.num_context", None),
    ("epochs-0", [*NEW, "optim.epochs=0"], 2, "optim.epochs", None),
    ("epochs-negative", [*NEW, "optim.epochs=-1"], 2, "optim.epochs", None),
    ("batch-0", [*NEW, "data.batch_size=0"], 2, "data.batch_size", None),
    ("threads-0", [*NEW, "run.threads=0"], 2, "run.threads", None),
    ("crop-not-multiple", [*NEW, "data.crop_size=30"], 2, "data.crop_size", None),
    ("unknown-key", [*NEW, "optim.lrr=1"], 2, "unknown config key 'optim.lrr'", None),
    ("tag-with-slash", [*NEW, "run.tag=a/b"], 2, "run.tag", None),
    ("logger-unknown", [*NEW, "run.loggers=bogus"], 2, "run.loggers", None),
    ("steps-negative", [*NEW, "--steps", "-3"], 2, "--steps", None),
    ("steps-text", [*NEW, "--steps", "abc"], 2, "invalid int value", None),
    ("two-configs", ["train", "demo_cpu", "other", "--run-dir", "{tmp}/new"], 2, "unexpected argument", None),
    ("unknown-option", [*NEW, "--bogus"], 2, "unrecognized arguments", None),
    # configs
    ("yaml-not-utf8", ["train", "{w}/latin1.yaml", "--run-dir", "{tmp}/new"], 2, "not a text file in UTF-8", None),
    ("yaml-duplicate-key", ["train", "{w}/dup.yaml", "--run-dir", "{tmp}/new"], 2, "given twice", None),
    ("yaml-a-list", ["train", "{w}/list.yaml", "--run-dir", "{tmp}/new"], 2, "expected a mapping", None),
    ("yaml-broken", ["train", "{w}/broken.yaml", "--run-dir", "{tmp}/new"], 2, "not valid YAML", None),
    ("config-missing", ["train", "no_such_config", "--run-dir", "{tmp}/new"], 2, "not found", None),
    ("config-print-bad-value", ["config", "optim.warmup=500"], 2, "optim.warmup", None),
    ("config-print-not-utf8", ["config", "{w}/latin1.yaml"], 2, "UTF-8", None),
    # data
    ("data-symlink-loop", [*NEW, "--data", "{w}/loop"], 2, "fewer than one global batch", None),
    ("data-all-corrupt", [*NEW, "--data", "{w}/corrupt", "data.batch_size=2"], 2, "unusable", None),
    ("data-missing", [*NEW, "--data", "{w}/nothing"], 2, "does not exist", None),
    ("data-a-file", [*NEW, "--data", "{w}/afile"], 2, "is not a folder", None),
    ("run-dir-under-a-file", ["train", "--run-dir", "{w}/afile/run", *TINY], 2, "cannot write to the run folder",
     None),
    # export
    ("export-over-existing", ["export", CKPT, "{w}/exists.safetensors"], 2, "already exists", None),
    ("export-txt", ["export", CKPT, "{tmp}/enc.txt"], 2, "writes a .safetensors file", None),
    ("export-missing-checkpoint", ["export", "{w}/nothing.pth.tar", "{tmp}/e.safetensors"], 2, "does not exist",
     None),
    ("export-junk", ["export", "{w}/junk.pth.tar", "{tmp}/e.safetensors"], 2, "not a checkpoint file", None),
    ("export-pickled", ["export", "{w}/pickled.pth.tar", "{tmp}/e.safetensors"], 2, "never unpickled", None),
    ("export-under-a-file", ["export", CKPT, "{w}/afile/e.safetensors"], 2, "is not a folder", None),
    ("export-heads-0", ["export", CKPT, "{tmp}/e.safetensors", "--num-heads", "0"], 2, "--num-heads", None),
    ("export-folder-format-to-a-file", ["export", CKPT, "{tmp}/e.safetensors", "--format", "timm"], 2,
     "writes a folder", None),
    ("export-full-disk", ["export", CKPT, "{tmp}/e.safetensors"], 1, "the disk is full", _full_disk_safetensors),
    ("export-timm-full-disk", ["export", CKPT, "{tmp}/t", "--format", "timm"], 1, "the disk is full",
     _full_disk_safetensors),
    # import
    ("import-pred-depth-0", ["import", "{w}/timm", "{tmp}/i.pth.tar", "--pred-depth", "0"], 2, "--pred-depth", None),
    ("import-pred-dim-negative", ["import", "{w}/timm", "{tmp}/i.pth.tar", "--pred-dim", "-1"], 2, "--pred-dim",
     None),
    ("import-pred-heads-0", ["import", "{w}/timm", "{tmp}/i.pth.tar", "--pred-heads", "0"], 2, "--pred-heads", None),
    ("import-pred-heads-not-dividing", ["import", "{w}/timm", "{tmp}/i.pth.tar", "--pred-heads", "5"], 2,
     "does not divide", None),
    ("import-over-existing", ["import", "{w}/timm", "{w}/exists.pth.tar"], 2, "already exists", None),
    ("import-missing", ["import", "{w}/nothing", "{tmp}/i.pth.tar"], 2, "does not exist", None),
    ("import-junk", ["import", "{w}/junk.safetensors", "{tmp}/i.pth.tar"], 2, "cannot read", None),
    ("import-txt", ["import", "{w}/timm", "{tmp}/i.txt"], 2, ".pth.tar", None),
    ("import-full-disk", ["import", "{w}/timm", "{tmp}/i.pth.tar", "--pred-depth", "1", "--pred-dim", "16"], 1,
     "the disk is full", _full_disk_torch),
    # extract
    ("extract-batch-0", [*EXTRACT, "--batch", "0"], 2, "--batch", None),
    ("extract-img-0", [*EXTRACT, "--img", "0"], 2, "--img", None),
    ("extract-img-not-multiple", [*EXTRACT, "--img", "30"], 2, "patch size", None),
    ("extract-workers-negative", [*EXTRACT, "--workers", "-1"], 2, "--workers", None),
    ("extract-over-existing", ["extract", CKPT, "--data", "{w}/imgs", "--out", "{w}/exists.safetensors"], 2,
     "already exists", None),
    ("extract-all-corrupt", ["extract", CKPT, "--data", "{w}/corrupt", "--workers", "0", "--out",
                             "{tmp}/f.safetensors"], 2, "could be decoded", None),
    ("extract-missing-data", ["extract", CKPT, "--data", "{w}/nothing", "--out", "{tmp}/f.safetensors"], 2,
     "does not exist", None),
    ("extract-device-banana", [*EXTRACT, "--device", "banana"], 2, "--device", None),
    pytest.param("extract-device-cuda", [*EXTRACT, "--device", "cuda"], 2, "CUDA is not available", None,
                 marks=NO_CUDA),
    ("extract-junk-checkpoint", ["extract", "{w}/junk.pth.tar", "--data", "{w}/imgs", "--out", "{tmp}/f.npy"], 2,
     "not a checkpoint file", None),
    ("extract-txt", ["extract", CKPT, "--data", "{w}/imgs", "--out", "{tmp}/f.txt"], 2, "--out", None),
    ("extract-under-a-file", ["extract", CKPT, "--data", "{w}/imgs", "--out", "{w}/afile/f.safetensors"], 2,
     "is not a folder", None),
    ("extract-full-disk", EXTRACT, 1, "the disk is full", _full_disk_safetensors),
    # probe
    ("probe-k-0", ["probe", "knn", *FEATS, "--k", "0"], 2, "--k", None),
    ("probe-k-too-many", ["probe", "knn", *FEATS, "--k", "1000"], 2, "more neighbours", None),
    ("probe-epochs-0", ["probe", "linear", *FEATS, "--epochs", "0"], 2, "--epochs", None),
    ("probe-epochs-negative", ["probe", "linear", *FEATS, "--epochs", "-5"], 2, "--epochs", None),
    ("lowshot-percent-0", ["probe", "lowshot", *FEATS, "--percent", "0"], 2, "--percent", None),
    ("lowshot-percent-500", ["probe", "lowshot", *FEATS, "--percent", "500"], 2, "--percent", None),
    ("lowshot-per-class-0", ["probe", "lowshot", *FEATS, "--per-class", "0"], 2, "--per-class", None),
    ("lowshot-nothing", ["probe", "lowshot", *FEATS], 2, "lowshot needs --per-class N or --percent P", None),
    ("lowshot-bad-seeds", ["probe", "lowshot", *FEATS, "--per-class", "1", "--seeds", "a,b"], 2, "--seeds", None),
    ("probe-missing-features", ["probe", "knn", "--train", "{w}/nothing.safetensors", "--val",
                                "{w}/feats.safetensors"], 2, "does not exist", None),
    ("probe-malformed-features", ["probe", "knn", "--train", "{w}/junk.safetensors", "--val",
                                  "{w}/feats.safetensors"], 2, "cannot read features", None),
    ("probe-folder-without-checkpoint", ["probe", "knn", "--train", "{w}/imgs", "--val", "{w}/imgs"], 2,
     "pass --checkpoint", None),
    ("probe-no-inputs", ["probe", "knn"], 2, "probe needs --train", None),
    ("probe-unknown-kind", ["probe", "svm", *FEATS], 2, "invalid choice", None),
    # bench: its values are checked before anything is allocated
    ("bench-batch-0", [*BENCH, "--batch", "0"], 2, "--batch", None),
    ("bench-batch-huge", [*BENCH, "--batch", "100000"], 2, "--batch", None),
    ("bench-steps-0", [*BENCH, "--steps", "0"], 2, "--steps", None),
    ("bench-warmup-negative", [*BENCH, "--warmup", "-1"], 2, "--warmup", None),
    ("bench-img-100", [*BENCH, "--img", "100"], 2, "not a multiple of the patch size", None),
    ("bench-patch-0", [*BENCH, "--patch", "0"], 2, "--patch", None),
    ("bench-model-nope", [*BENCH, "--model", "vit_nope"], 2, "--model vit_nope", None),
    ("bench-device-banana", [*BENCH, "--device", "banana"], 2, "--device", None),
    ("bench-config-missing", ["bench", "{w}/nothing.yaml", "--device", "cpu"], 2, "nothing.yaml", None),
    ("bench-config-broken", ["bench", "{w}/broken.yaml", "--device", "cpu"], 2, "broken.yaml", None),
    ("bench-override-unknown", ["bench", "demo_cpu", "model.embd_dim=32", "--device", "cpu"], 2, "model.embd_dim",
     None),
    ("bench-override-bad-value", ["bench", "demo_cpu", "data.batch_size=-3", "--device", "cpu"], 2,
     "data.batch_size", None),
    ("bench-repeats-0", [*BENCH, "--repeats", "0"], 2, "--repeats", None),
    ("bench-suite-missing", ["bench", "--suite", "{w}/nothing.yaml"], 2, "nothing.yaml does not exist", None),
    ("bench-suite-broken", ["bench", "--suite", "{w}/broken.yaml"], 2, "not valid YAML", None),
    ("bench-suite-and-config", ["bench", "demo_cpu", "--suite", "{w}/broken.yaml"], 2, "the suite names its configs",
     None),
    # shard
    ("shard-into-a-run", ["shard", "{w}/imgs", "{w}/run"], 2, "not empty", None),
    ("shard-into-a-file", ["shard", "{w}/imgs", "{w}/afile"], 2, "is a file", None),
    ("shard-missing", ["shard", "{w}/nothing", "{tmp}/s"], 2, "does not exist", None),
    ("shard-size-text", ["shard", "{w}/imgs", "{tmp}/s", "--size", "abc"], 2, "--size", None),
    ("shard-size-0", ["shard", "{w}/imgs", "{tmp}/s", "--size", "0"], 2, "at least one byte", None),
    ("shard-max-images-0", ["shard", "{w}/imgs", "{tmp}/s", "--max-images", "0"], 2, "--max-images", None),
    ("shard-symlink-loop", ["shard", "{w}/loop", "{tmp}/s"], 0, "2 images", None),
    ("help-names-exit-codes", ["--help"], 0, "143", None),
    ("train-help-names-exit-codes", ["train", "--help"], 0, "130", None),
]


def _ids():
    return [c.values[0] if hasattr(c, "values") else c[0] for c in CASES]


@pytest.mark.parametrize("case,argv,code,fragment,patch", CASES, ids=_ids())
def test_hostile_case_ends_cleanly_and_changes_nothing(case, argv, code, fragment, patch, world, tmp_path, capsys,
                                                       monkeypatch):
    scratch = tmp_path / "cwd"
    scratch.mkdir()
    monkeypatch.chdir(scratch)
    if patch:
        patch(monkeypatch)
    before = snapshot(world)
    rc, out, err = cli([a.format(w=world, tmp=scratch) for a in argv], capsys)
    assert rc == code, f"exit {rc}, expected {code}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert snapshot(world) == before, "the command changed files it must leave alone"
    assert not (world / "run" / ".lock").exists()
    if code == 0:
        assert fragment in out + err, (out + err)[-2000:]
        return
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], err[-2000:]
    left = [p.name for p in scratch.iterdir()]
    assert not left, f"a failed command left {left} behind"


def test_hostile_table_is_at_least_sixty_cases():
    assert len(CASES) >= 60


def test_config_warnings_name_the_key():
    """Values a user could mean are warned about, naming the key and why."""
    from ijepa_fast.config import load_config
    from ijepa_fast.config.validate import config_warnings

    cfg = load_config("demo_cpu", [f"run.threads={10 * (os.cpu_count() or 1)}", "optim.final_lr=0.5",
                                   "model.mlp_ratio=0.5", "mask.num_targets=20"])
    got = " | ".join(config_warnings(cfg))
    for key in ("run.threads", "optim.final_lr", "model.mlp_ratio", "mask.num_targets"):
        assert key in got, got
    assert config_warnings(load_config("demo_cpu")) == []


def _copy(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(run), str(to)], check=True)
    return to


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_force_moves_the_old_run_aside(world, tmp_path, capsys):
    run = _copy(world / "run", tmp_path / "run")
    before = snapshot(run)
    rc, _, err = cli(["train", "--run-dir", run, "--steps", "2", *TINY, "run.resume=null", "--force"], capsys)
    assert rc == 0, err[-3000:]
    previous = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1 and "moved to" in err
    assert snapshot(previous[0]) == before  # every old file, as it was
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2]


def test_force_rewind_keeps_the_later_rows_in_a_side_file(world, tmp_path, capsys):
    run = _copy(world / "run", tmp_path / "run")
    old = _rows(run / "metrics.jsonl")
    rc, _, err = cli(["train", "--run-dir", run, "--steps", "3", *TINY,
                      f"run.resume={run / 'jepa-step00000002.pth.tar'}", "--force"], capsys)
    assert rc == 0, err[-3000:]
    side = list(run.glob("metrics-after-step2-*.jsonl"))
    assert len(side) == 1 and _rows(side[0]) == [r for r in old if r["step"] > 2]
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3]
    assert [r for r in _rows(run / "metrics.jsonl") if r["step"] <= 2] == old[:2]
    moved = list(run.glob("previous-*/jepa-step00000004.pth.tar"))
    assert len(moved) == 1  # the later checkpoint is kept, out of the way


def test_torn_last_metrics_line_is_moved_aside_and_resume_goes_on(world, tmp_path, capsys):
    run = _copy(world / "run", tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 0.6, "lo')  # killed mid-write
    rc, _, err = cli(["train", "--run-dir", run, "--steps", "5", *TINY], capsys)
    assert rc == 0, err[-3000:]
    assert "do not parse" in err
    torn = list(run.glob("metrics-torn-*.jsonl"))
    assert len(torn) == 1 and torn[0].read_text().startswith('{"step": 5, "epoch": 0.6, "lo')
    assert [r["step"] for r in _rows(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_a_locked_run_folder_is_refused_and_a_stale_lock_taken_over(world, tmp_path, capsys):
    run = _copy(world / "run", tmp_path / "run")
    holder = subprocess.Popen(["sleep", "120"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        before = snapshot(run)
        rc, _, err = cli(["train", "--run-dir", run, "--steps", "5", *TINY], capsys)
        assert rc == 2 and f"in use by process {holder.pid} on {socket.gethostname()}" in err, err[-2000:]
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    rc, _, err = cli(["train", "--run-dir", run, "--steps", "5", *TINY], capsys)  # the holder is gone now
    assert rc == 0 and "taking over the lock" in err and f"process {holder.pid}" in err, err[-2000:]
    assert not (run / ".lock").exists()


def _train_until(run: Path, rows: int, *extra):
    """A training subprocess, once ``rows`` metric rows are written."""
    proc = subprocess.Popen([sys.executable, "-m", "ijepa_fast", "train", "--run-dir", str(run), "--steps", "500",
                             "run.checkpoint_every=1000", *TINY, "optim.epochs=100", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rows:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the training did not get to {rows} rows: {proc.communicate()[1][-2000:]}")


def test_ctrl_c_finishes_the_step_checkpoints_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = _train_until(run, 3)
    busy = run_cli("train", "--run-dir", run, "--steps", "500", *TINY, "optim.epochs=100", check=False)
    assert busy.returncode == 2 and f"in use by process {proc.pid}" in busy.stderr, busy.stderr[-2000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SIGINT: checkpoint at step" in err and "To resume:" in err
    step = torch.load(run / "jepa-latest.pth.tar", weights_only=True)["ijepa_fast"]["step"]
    rows = _rows(run / "metrics.jsonl")
    assert step >= 3 and rows[-1]["step"] == step  # every step done is kept
    assert not (run / ".lock").exists()
    p = run_cli("train", "--run-dir", run, "--steps", str(step + 1), *TINY, "optim.epochs=100")
    assert f"at step {step}" in p.stderr


def test_sigusr1_checkpoints_and_exits_138(tmp_path):
    run = tmp_path / "run"
    proc = _train_until(run, 2)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 138, err[-3000:]
    assert "SIGUSR1: checkpoint at step" in err
    assert torch.load(run / "jepa-latest.pth.tar", weights_only=True)["ijepa_fast"]["step"] >= 2


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    run = tmp_path / "run"
    proc = _train_until(run, 2)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert not (run / ".lock").exists()


def test_trainer_run_gives_the_lock_back(world, tmp_path):
    """A library user's Trainer(cfg).run(), twice in one process on one folder: the second continues the run."""
    from ijepa_fast.config import load_config
    from ijepa_fast.training.trainer import Trainer

    run = _copy(world / "run", tmp_path / "run")
    for steps in (5, 6):
        cfg = load_config("demo_cpu", [*TINY, f"run.dir={run}", f"run.max_steps={steps}"])
        Trainer(cfg).run()
        assert not (run / ".lock").exists()
    assert torch.load(run / "jepa-latest.pth.tar", weights_only=True)["ijepa_fast"]["step"] == 6
