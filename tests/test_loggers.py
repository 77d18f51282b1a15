"""run.loggers: TensorBoard and Weights & Biases receive exactly the rows of metrics.jsonl.

Each test trains the tiny config for real, then reads what the logger wrote with an independent
reader (TensorBoard's EventAccumulator; the W&B run file decoded record by record with wandb's own
protobuf classes) and compares it with metrics.jsonl, the source of truth.
"""
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time

import pytest

from ijepa_fast.errors import ConfigError, TrainingStopped
from ijepa_fast.runlog.output import read_metrics


def _train(cfg, run_dir, force=False, **run):
    from ijepa_fast.training.trainer import train

    cfg.run.dir = str(run_dir)
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return train(cfg, force=force)


def _expected(rows) -> dict:
    """metrics.jsonl as {step: {train/<column>: value}}: the numbers of each row, the step being the x axis."""
    out = {}
    for r in rows:
        out[r["step"]] = {f"train/{k}": v for k, v in r.items()
                          if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
    return out


def _tensorboard(run_dir) -> dict:
    """The event files under <run>/tensorboard as {step: {tag: value}} (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        for e in events:
            out.setdefault(e.step, {})[tag] = e.value
    return out


def _wandb_records(path):
    """The records of a W&B run file (.wandb): the LevelDB log format (32 KiB blocks, 7-byte record
    headers, records split FIRST/MIDDLE/LAST across blocks) after a 7-byte ':W&B' file header, each
    record a wandb_internal_pb2.Record. wandb >= 0.18 ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if not data[7:]:
        return []
    assert data[:4] == b":W&B"
    block, pos, buf, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _finished_records(path, wait_s=120):
    """The records of a finished W&B run file. ``run.finish()`` returns before wandb's service process
    has written the file out; it ends with the run's exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        recs = _wandb_records(path)
        if "exit" in _kinds(recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.1)


def _wandb(run_dir):
    """(history {step: {key: value}}, the runs' ids, their records) from every W&B run file in <run>/wandb."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no W&B run file under {run_dir / 'wandb'}"
    history, ids, records = {}, [], []
    for f in files:
        recs = _finished_records(f)
        records.append(recs)
        for r in recs:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.append(r.run.run_id)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history, ids, records


def _kinds(records) -> list:
    return [r.WhichOneof("record_type") for r in records]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B offline, every folder of its own in tmp_path, no credentials: nothing leaves the machine."""
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (tmp_path / var.lower()).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var.lower()))


def test_loggers_tensorboard_scalars_equal_jsonl(tiny_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    tiny_cfg.run.monitor_every, tiny_cfg.run.monitor_images = 6, 16  # the monitor's columns ride along
    run = _train(tiny_cfg, tmp_path / "run", loggers=["jsonl", "tensorboard"], max_steps=12)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert "feat_std" in rows[5] and "feat_std" not in rows[4]
    expected, got = _expected(rows), _tensorboard(run)
    assert sorted(got) == sorted(expected)
    for step, scalars in expected.items():
        assert set(got[step]) == set(scalars), step
        for tag, v in scalars.items():  # event files hold float32
            assert got[step][tag] == pytest.approx(v, rel=1e-6, abs=1e-30), (step, tag)


def test_loggers_tensorboard_resumed_run_replaces_the_events_after_its_checkpoint(tiny_cfg, tmp_path):
    """Resuming from step 4 of a run that logged 8 steps: steps 5-8 are logged again, once, with the new values."""
    pytest.importorskip("tensorboard")
    run = _train(tiny_cfg, tmp_path / "run", loggers=["tensorboard"], max_steps=8, checkpoint_every=4)
    first = _tensorboard(run)
    assert sorted(first) == list(range(1, 9))
    tiny_cfg.optim.lr *= 3  # the resumed steps differ from the first run's
    _train(tiny_cfg, run, force=True, loggers=["tensorboard"], max_steps=10,  # a rewind: force
           resume=str(run / "jepa-step00000004.pth.tar"))
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))
    got = _tensorboard(run)
    assert sorted(got) == list(range(1, 11))
    assert got[6]["train/lr"] != pytest.approx(first[6]["train/lr"])
    for step, scalars in _expected(rows).items():
        assert got[step] == pytest.approx(scalars, rel=1e-6, abs=1e-30), step


def test_loggers_wandb_offline_history_equals_jsonl_and_resume_continues_the_run(tiny_cfg, tmp_path, wandb_env):
    pytest.importorskip("wandb")
    run = _train(tiny_cfg, tmp_path / "run", loggers=["wandb"], max_steps=6, checkpoint_every=3)
    run_id = (run / "wandb_run_id").read_text().strip()
    history, ids, records = _wandb(run)
    assert ids == [run_id]
    assert history == _expected(read_metrics(run / "metrics.jsonl"))  # JSON numbers: exact
    config = next(r.run.config for r in records[0] if r.WhichOneof("record_type") == "run")
    values = {i.key: json.loads(i.value_json) for i in config.update}
    assert values["optim"]["lr"] == tiny_cfg.optim.lr and values["run"]["loggers"] == ["wandb"]
    assert next(r.run.display_name for r in records[0] if r.WhichOneof("record_type") == "run") == "run"
    exits = [r.exit.exit_code for r in records[0] if r.WhichOneof("record_type") == "exit"]
    assert exits == [0]  # finished cleanly
    # resumed (mode from the config now, not the environment): the same W&B run continues
    os.environ.pop("WANDB_MODE")
    _train(tiny_cfg, run, loggers=["jsonl", "wandb"], max_steps=9, wandb_mode="offline")
    history, ids, _ = _wandb(run)
    assert ids == [run_id, run_id]
    assert history == _expected(read_metrics(run / "metrics.jsonl"))
    assert sorted(history) == list(range(1, 10))


@pytest.mark.parametrize("how", ["nonfinite", "sigterm"])
def test_loggers_close_cleanly_when_the_run_stops(tiny_cfg, tmp_path, wandb_env, monkeypatch, how):
    """A non-finite loss (TrainingStopped) or a stop signal: both loggers hold every row written and are closed."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    import ijepa_fast.training.engine as train_mod  # the trainer steps through its Engine

    real = train_mod.train_step

    def step(model, optimizer, images, masks, i, *a, **k):
        if i == 4:  # the fifth step
            if how == "nonfinite":
                raise FloatingPointError(f"loss is nan at step {i}")
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, optimizer, images, masks, i, *a, **k)

    monkeypatch.setattr(train_mod, "train_step", step)
    loggers = ["jsonl", "tensorboard", "wandb"]
    if how == "nonfinite":
        with pytest.raises(TrainingStopped):
            _train(tiny_cfg, tmp_path / "run", loggers=loggers)
    else:
        _train(tiny_cfg, tmp_path / "run", loggers=loggers)
    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == ([1, 2, 3, 4] if how == "nonfinite" else [1, 2, 3, 4, 5])
    expected = _expected(rows)
    tb = _tensorboard(run)
    assert sorted(tb) == sorted(expected)
    for s in expected:
        assert tb[s] == pytest.approx(expected[s], rel=1e-6, abs=1e-30)
    history, _, records = _wandb(run)
    assert history == expected
    kinds = _kinds(records[0])
    exits = [r.exit.exit_code for r in records[0] if r.WhichOneof("record_type") == "exit"]
    assert exits == ([1] if how == "nonfinite" else [0])
    assert ("preempting" in kinds) == (how == "sigterm")


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_loggers_missing_package_is_a_config_error_before_any_work(tiny_cfg, tmp_path, monkeypatch, name):
    from ijepa_fast.training.trainer import Trainer

    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: its import and find_spec fail
    tiny_cfg.run.dir = str(tmp_path / "run")
    tiny_cfg.run.loggers = ["jsonl", name]
    with pytest.raises(ConfigError, match=rf"run.loggers: {name} .*pip install 'ijepa-fast\[{name}\]'"):
        Trainer(tiny_cfg)
    assert not (tmp_path / "run").exists()


def test_loggers_are_imported_only_when_chosen(tmp_path):
    """Installed but not chosen: neither ijepa_fast, its trainer nor a config naming them imports them."""
    code = ("import sys, ijepa_fast, ijepa_fast.training.trainer, ijepa_fast.runlog.loggers\n"
            "from ijepa_fast.config import load_config\n"
            "c = load_config('demo_cpu', ['run.loggers=[jsonl,tensorboard,wandb]'])\n"
            "assert c.run.loggers == ['jsonl', 'tensorboard', 'wandb']\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'wandb')))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"


def test_loggers_from_the_command_line_under_two_processes_rank_0_only(tmp_path):
    """`run.loggers=[jsonl,tensorboard]` on the command line, two DDP ranks: one event file, the JSONL rows."""
    pytest.importorskip("tensorboard")
    from test_distributed import TINY, torchrun

    torchrun(2, "train", "--run-dir", tmp_path / "run", "--steps", "3", "data.batch_size=4",
             "run.loggers=[jsonl,tensorboard]", *TINY)
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    got = _tensorboard(tmp_path / "run")
    for step, scalars in _expected(rows).items():
        assert got[step] == pytest.approx(scalars, rel=1e-6, abs=1e-30), step
    assert sorted(got) == [1, 2, 3]
