import os

import pytest
import torch
from conftest import GOLDEN

from ijepa_fast.checkpoint.format import (
    CheckpointError,
    add_prefix,
    encoder_from_checkpoint,
    export_safetensors,
    load_strict,
    models_from_checkpoint,
    read_checkpoint,
    save_atomic,
)
from ijepa_fast.model import IJEPA


def small():
    return IJEPA.build("custom", img_size=32, patch_size=8, pred_depth=1, pred_dim=16, embed_dim=32, depth=2,
                       num_heads=2)


def published_layout(model):
    return {"encoder": add_prefix(model.encoder.state_dict()), "predictor": add_prefix(model.predictor.state_dict()),
            "target_encoder": add_prefix(model.target_encoder.state_dict()), "opt": None, "scaler": None, "epoch": 3,
            "loss": 0.1, "batch_size": 8, "world_size": 1, "lr": 1e-3}


def test_checkpoint_round_trip_builds_models_from_weights(tmp_path):
    m = small()
    with torch.no_grad():
        m.target_encoder.blocks[0].attn.qkv.weight.add_(1.0)
    save_atomic(published_layout(m), tmp_path / "c.pth.tar")
    enc, pred, tgt = models_from_checkpoint(tmp_path / "c.pth.tar", num_heads=2)
    for a, b in ((enc, m.encoder), (pred, m.predictor), (tgt, m.target_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert enc.grid == (4, 4) and enc.patch_size == 8 and pred.predictor_blocks[0].attn.num_heads == 2
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(tgt(x), m.target_encoder(x))


def test_checkpoint_published_golden_file_loads():
    ckpt = read_checkpoint(GOLDEN / "ref_ckpt_tiny.pth.tar")
    assert all(k.startswith("module.") for k in ckpt["encoder"])
    gold = torch.load(GOLDEN / "ref_step_tiny.pt", weights_only=False)
    enc = encoder_from_checkpoint(ckpt, "target_encoder", num_heads=gold["config"]["num_heads"])
    for k, v in gold["state_before"]["target_encoder"].items():
        assert torch.equal(enc.state_dict()[k], v)


def test_checkpoint_strict_load_lists_missing_and_unexpected_keys():
    m = small()
    state = m.encoder.state_dict()
    state.pop("norm.weight")
    state["blocks.9.extra"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 4, 8)
    with pytest.raises(CheckpointError) as e:
        load_strict(m.encoder, add_prefix(state), "encoder")
    msg = str(e.value)
    assert "missing keys (1): norm.weight" in msg and "unexpected keys (1): blocks.9.extra" in msg
    assert "pos_embed: checkpoint (1, 4, 8) vs model (1, 16, 32)" in msg


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth.tar")
    (tmp_path / "torn.pth.tar").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(tmp_path / "torn.pth.tar")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an I-JEPA checkpoint"):
        read_checkpoint(tmp_path / "other.pt")
    state = small().encoder.state_dict()
    save_atomic({"encoder": state, "target_encoder": state}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="give it \\(--num-heads N"):
        encoder_from_checkpoint(tmp_path / "odd.pt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth.tar"
    save_atomic({"encoder": {"w": torch.ones(3)}}, path)

    def dies_midway(obj, f, *a, **k):
        with open(f, "ab") as out:
            out.write(b"partial bytes")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"encoder": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["encoder"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["latest.pth.tar"]  # no temporary file left behind

    def disk_full(obj, f, *a, **k):
        with open(f, "ab") as out:
            out.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    from ijepa_fast.errors import MachineError

    with pytest.raises(MachineError, match="the disk is full; free some space and run again \\(the previous file is "
                                           "intact\\)"):  # the machine's failure: exit status 1
        save_atomic({"encoder": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["encoder"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["latest.pth.tar"]


def test_checkpoint_export_safetensors(tmp_path):
    from safetensors import safe_open

    m = small()
    save_atomic(published_layout(m) | {"ijepa_fast": {"num_heads": 2}}, tmp_path / "c.pth.tar")
    out = export_safetensors(tmp_path / "c.pth.tar", tmp_path / "enc.safetensors")
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert keys == set(m.target_encoder.state_dict())
        assert torch.equal(f.get_tensor("norm.weight"), m.target_encoder.norm.weight)
        meta = f.metadata()
    assert meta["which"] == "target_encoder" and meta["patch_size"] == "8" and meta["num_heads"] == "2"


def test_checkpoint_own_files_build_without_head_counts(tmp_path):
    m = small()
    save_atomic(published_layout(m) | {"ijepa_fast": {"num_heads": 2, "pred_heads": 2}}, tmp_path / "c.pth.tar")
    enc, pred, _ = models_from_checkpoint(tmp_path / "c.pth.tar")
    assert enc.num_heads == 2 and pred.predictor_blocks[0].attn.num_heads == 2
    assert encoder_from_checkpoint(tmp_path / "c.pth.tar").num_heads == 2


def test_checkpoint_file_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_atomic({"encoder": {}}, tmp_path / "c.pth.tar")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pth.tar").stat().st_mode & 0o777 == 0o644


class _Planted:
    """Unpickling this runs code (it touches a file): what a hostile checkpoint could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_never_unpickles_arbitrary_objects(tmp_path):
    """A published or downloaded checkpoint is read with weights_only: a planted object is refused with
    a CheckpointError before it can run, by every command that reads checkpoints."""
    from conftest import run_cli

    from ijepa_fast.checkpoint.format import read_checkpoint

    marker = tmp_path / "ran"
    bad = tmp_path / "hostile.pth.tar"
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=16, embed_dim=32, depth=1,
                        num_heads=2)
    torch.save({"encoder": model.encoder.state_dict(), "target_encoder": model.target_encoder.state_dict(),
                "predictor": model.predictor.state_dict(), "payload": _Planted(marker)}, bad)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(bad)
    p = run_cli("export", bad, tmp_path / "out.safetensors", check=False)
    assert p.returncode == 2 and "cannot read checkpoint" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    torch.load(bad, weights_only=False)  # the planted object is real: unpickling it does run
    assert marker.exists()
