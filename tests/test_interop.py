"""Export to timm's and transformers' layouts and import back: the features of the exported encoder,
computed by timm's VisionTransformer and by transformers' IJepaModel, equal ours; import(export(x))
is x; ``which`` selects the target or the context encoder.

timm and transformers are optional (``pip install ijepa-fast`` pulls neither): their tests skip,
saying why, where the library cannot be imported.

A SHIM, only where needed: torchvision (which ``import timm`` needs, and which transformers imports
when it is installed) is published on the package registry as CUDA builds. Beside the CPU build of
torch its compiled ops cannot load, and its ``torchvision._meta_registrations`` module then fails
at import ("operator torchvision::nms does not exist"), because it registers fake kernels for
those ops unconditionally. Only when the compiled library fails to load does
``_stub_unloadable_torchvision_ops`` put an empty module in place of that one module, before
anything imports torchvision; the real torchvision, timm and transformers are imported. The model
code under test never calls a torchvision op (timm's VisionTransformer and transformers'
IJepaModel are plain torch); nothing else is replaced.

timm cannot be a test extra: its torchvision requirement resolves to a CUDA build of torch. CI installs
timm and torchvision without dependencies into a folder of their own and names it in
``IJEPA_FAST_TIMM_SITE``, which this module (only) puts on the import path, so that other processes of
the suite (Lightning imports torchvision when it finds one) never see that torchvision.
"""
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from ijepa_fast.checkpoint.format import (
    CheckpointError,
    add_prefix,
    encoder_from_checkpoint,
    models_from_checkpoint,
    read_checkpoint,
    save_atomic,
    strip_prefix,
)
from ijepa_fast.cli import main
from ijepa_fast.interop.export import export_encoder, from_hf, to_hf
from ijepa_fast.interop.importer import import_encoder
from ijepa_fast.model import IJEPA


def _stub_unloadable_torchvision_ops():
    """The shim the module docstring describes; does nothing where torchvision is absent or works."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or "torchvision" in sys.modules or not spec.submodule_search_locations:
        return
    lib = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    try:
        if lib is not None:
            torch.ops.load_library(str(lib))
            return
    except OSError:
        pass
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")


if os.path.isdir(os.environ.get("IJEPA_FAST_TIMM_SITE", "")):
    sys.path.append(os.environ["IJEPA_FAST_TIMM_SITE"])
_stub_unloadable_torchvision_ops()


def small(**kw):
    return IJEPA.build("custom", img_size=32, patch_size=8, pred_depth=1, pred_dim=16, embed_dim=32, depth=2,
                       num_heads=2, **kw)


def checkpoint(tmp_path, model=None, heads=True):
    """A checkpoint whose target encoder differs from its context encoder (as after training)."""
    m = model or small()
    with torch.no_grad():
        for p in m.target_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {"encoder": add_prefix(m.encoder.state_dict()), "predictor": add_prefix(m.predictor.state_dict()),
             "target_encoder": add_prefix(m.target_encoder.state_dict()), "opt": None, "scaler": None, "epoch": 1,
             "loss": 0.1, "batch_size": 8, "world_size": 1, "lr": 1e-3}
    if heads:
        state["ijepa_fast"] = {"num_heads": 2, "pred_heads": 2}
    save_atomic(state, tmp_path / "c.pth.tar")
    return m, tmp_path / "c.pth.tar"


def _timm():
    try:
        import timm
    except ImportError as e:
        pytest.skip(f"timm cannot be imported ({e}); it installs without dependencies: pip install --no-deps timm "
                    f"plus the torchvision release that matches torch")
    return timm


def _same(a: torch.Tensor, b: torch.Tensor, atol=1e-5):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("which", ["target", "encoder"])
def test_interop_hf_ijepa_model_features_equal_ours(tmp_path, which):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install 'ijepa-fast[test]')")
    from transformers import IJepaModel, ViTImageProcessor

    m, ckpt = checkpoint(tmp_path)
    ours = m.target_encoder if which == "target" else m.encoder
    other = m.encoder if which == "target" else m.target_encoder
    out, msg = export_encoder(ckpt, tmp_path / "hf", format="hf", which=which)
    assert ("target encoder" in msg) == (which == "target") and ("context encoder" in msg) == (which == "encoder")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert json.loads((out / "config.json").read_text())["ijepa_fast"]["which"] == ours_entry(which)
    hf, info = IJepaModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    hf.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = hf(pixel_values=x).last_hidden_state
        _same(got, ours(x))
        assert (got - other(x)).abs().max() > 1e-2  # the other encoder's features are not these
        # another resolution: both interpolate the positional table bicubically
        x48 = torch.randn(2, 3, 48, 48)
        _same(hf(pixel_values=x48, interpolate_pos_encoding=True).last_hidden_state, ours(x48))
    proc = ViTImageProcessor.from_pretrained(out)
    assert tuple(proc(images=[torch.zeros(3, 40, 40, dtype=torch.uint8).numpy()], return_tensors="pt",
                      input_data_format="channels_first")["pixel_values"].shape) == (1, 3, 32, 32)


def ours_entry(which):
    return "target_encoder" if which == "target" else "encoder"


def test_interop_hf_saved_model_imports_with_equal_features(tmp_path):
    """A folder transformers wrote itself (not ours) imports, and our encoder reproduces its features."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install 'ijepa-fast[test]')")
    from transformers import IJepaConfig, IJepaModel

    cfg = IJepaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32,
                      patch_size=16, layer_norm_eps=1e-6, qkv_bias=False)
    hf = IJepaModel(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    path, msg = import_encoder(tmp_path / "hf", tmp_path / "imp.pth.tar", pred_depth=1, pred_dim=24)
    assert "model.pred_depth=1" in msg and "model.num_heads=3" in msg and "model.mlp_ratio=2.0" in msg
    enc = encoder_from_checkpoint(path)
    assert enc.num_heads == 3 and enc.blocks[0].attn.qkv.bias is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _same(enc(x), hf(pixel_values=x).last_hidden_state)
    # the in-memory names of transformers 5 import the same
    assert all(torch.equal(a, b) for a, b in zip(from_hf(hf.state_dict()).values(), from_hf(
        {k: v for k, v in torch.load(_bin(tmp_path, hf), weights_only=True).items()}).values()))


def _bin(tmp_path, hf):
    torch.save(hf.state_dict(), tmp_path / "sd.bin")
    return tmp_path / "sd.bin"


def test_interop_timm_vision_transformer_features_equal_ours(tmp_path):
    timm = _timm()
    m, ckpt = checkpoint(tmp_path)
    out, msg = export_encoder(ckpt, tmp_path / "timm", format="timm")
    assert "target encoder" in msg
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_args"]["class_token"] is False and cfg["ijepa_fast"]["which"] == "target_encoder"
    model = timm.create_model(cfg["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")), **cfg["model_args"])
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = m.target_encoder(x)
        _same(model.forward_features(x), ours)
        _same(model(x), ours.mean(1))  # global_pool='avg', no head: the features extract and probe use
        assert (model.forward_features(x) - m.encoder(x)).abs().max() > 1e-2
        if hasattr(timm.models, "load_model_config_from_path"):  # local-dir: (timm 1.0.16+)
            _same(timm.create_model(f"local-dir:{out}", pretrained=True).eval().forward_features(x), ours)


def test_interop_timm_state_dict_imports_with_equal_features(tmp_path):
    timm = _timm()
    model = timm.create_model("vit_base_patch16_gap_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=5).eval()
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    path, _ = import_encoder(tmp_path / "timm.pth", tmp_path / "imp.pth.tar", num_heads=4, pred_depth=1, pred_dim=16)
    enc = encoder_from_checkpoint(path)  # the head count is recorded: no num_heads needed
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _same(enc(x), model.forward_features(x))
    cls = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_heads=4)
    torch.save(cls.state_dict(), tmp_path / "cls.pth")
    with pytest.raises(CheckpointError, match="class token"):
        import_encoder(tmp_path / "cls.pth", tmp_path / "bad.pth.tar", num_heads=4)


@pytest.mark.parametrize("fmt", ["timm", "hf"])
@pytest.mark.parametrize("which", ["target", "encoder"])
def test_interop_import_of_export_is_the_exported_encoder(tmp_path, fmt, which):
    m, ckpt = checkpoint(tmp_path)
    src = read_checkpoint(ckpt)
    out, _ = export_encoder(ckpt, tmp_path / fmt, format=fmt, which=which)
    path, _ = import_encoder(out, tmp_path / "imp.pth.tar", pred_depth=1, pred_dim=16)
    back = read_checkpoint(path)
    want = src[ours_entry(which)]
    for entry in ("encoder", "target_encoder"):
        assert back[entry].keys() == want.keys()
        assert all(torch.equal(back[entry][k], want[k]) for k in want)
    other = src["encoder" if which == "target" else "target_encoder"]
    assert not torch.equal(back["encoder"]["module.norm.weight"], other["module.norm.weight"])
    assert back["opt"] is None and back["epoch"] == 0 and back["ijepa_fast"]["imported"]["predictor"] == "fresh"
    enc, pred, tgt = models_from_checkpoint(path)  # the predictor is fresh, of the asked size
    assert len(pred.predictor_blocks) == 1 and pred.predictor_embed.out_features == 16
    assert not torch.equal(pred.predictor_proj.weight, m.predictor.predictor_proj.weight)


def test_interop_hf_keys_round_trip_and_split_qkv():
    state = small().encoder.state_dict()
    hf = to_hf(state)
    q = hf["encoder.layer.1.attention.attention.query.weight"]
    assert torch.equal(q, state["blocks.1.attn.qkv.weight"][:32])
    back = from_hf(hf)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match="unknown keys"):
        from_hf({**hf, "encoder.layer.0.extra.weight": torch.zeros(1)})


def test_interop_cli_export_import_and_continue_training(tmp_path, tiny_cfg):
    from ijepa_fast.training.trainer import Trainer

    m = IJEPA.from_config(tiny_cfg)
    _, ckpt = checkpoint(tmp_path, m)
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--format", "hf", "--which", "encoder"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["ijepa_fast"]["which"] == "encoder"
    assert main(["import", str(tmp_path / "hf"), str(tmp_path / "imp.pth.tar"), "--pred-depth",
                 str(tiny_cfg.model.pred_depth), "--pred-dim", str(tiny_cfg.model.pred_dim)]) == 0
    # continued pretraining: run.resume names the imported file; the run starts at step 0 from its weights
    tiny_cfg.run.resume = str(tmp_path / "imp.pth.tar")
    tiny_cfg.run.dir = str(tmp_path / "run")
    trainer = Trainer(tiny_cfg)
    assert trainer.step == 0
    want = strip_prefix(read_checkpoint(ckpt)["encoder"])
    for name in ("encoder", "target_encoder"):
        got = getattr(trainer.model, name).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_interop_needs_neither_timm_nor_transformers(tmp_path):
    _, ckpt = checkpoint(tmp_path)
    code = ("import sys; sys.modules['timm'] = sys.modules['transformers'] = sys.modules['torchvision'] = None\n"
            "from ijepa_fast.interop.export import export_encoder\n"
            "from ijepa_fast.interop.importer import import_encoder\n"
            f"for f in ('timm', 'hf'):\n"
            f"    out, _ = export_encoder({str(ckpt)!r}, {str(tmp_path)!r} + '/' + f, format=f)\n"
            f"    import_encoder(out, {str(tmp_path)!r} + '/i.pth.tar')\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_interop_errors(tmp_path):
    _, ckpt = checkpoint(tmp_path, heads=False)  # width 32 is no standard size and the file has no head count
    with pytest.raises(CheckpointError, match="head count"):
        export_encoder(ckpt, tmp_path / "t", format="timm")
    assert not (tmp_path / "t").exists()
    out, _ = export_encoder(ckpt, tmp_path / "t", format="timm", num_heads=2)
    with pytest.raises(CheckpointError, match="already an I-JEPA checkpoint"):
        import_encoder(ckpt, tmp_path / "x.pth.tar")
    (tmp_path / "f").write_text("")
    with pytest.raises(CheckpointError, match="folder"):
        export_encoder(ckpt, tmp_path / "f", format="hf", num_heads=2)
    assert main(["export", str(ckpt), str(tmp_path / "t2"), "--format", "timm"]) == 2
