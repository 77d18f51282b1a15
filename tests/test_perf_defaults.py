"""Fast by default: every perf switch is 'auto', resolved per device in one place (``perf.resolve``)
and recorded resolved; compile always runs static shapes (token buckets), so after the warm-up no
graph is compiled and no block graph holds a symbolic size."""
import dataclasses

import pytest
import torch
import yaml

from ijepa_fast.config import MaskConfig, PerfConfig, load_config
from ijepa_fast.errors import ConfigError
from ijepa_fast.model import IJEPA
from ijepa_fast.perf import switches as perf
from ijepa_fast.training.engine import Engine
from ijepa_fast.training.schedules import Schedules

CUDA, CPU = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU


def test_every_switch_defaults_to_auto_and_the_recipes_set_none():
    switches = ("preset", "bf16_weights", "activation_checkpointing", "token_buckets", "compile", "fp8", "optimizer")
    assert all(getattr(PerfConfig(), k) == "auto" for k in switches)
    for recipe in ("in1k_vith14_ep300", "in1k_vitb16", "demo_cpu"):
        assert load_config(recipe, []).perf == PerfConfig(), recipe


def test_auto_resolves_to_the_fastest_measured_step_per_device():
    cuda = perf.resolve(PerfConfig(), CUDA)
    assert (cuda.bf16_weights, cuda.compile, cuda.token_buckets, cuda.optimizer, cuda.fp8,
            cuda.activation_checkpointing) == (True, True, perf.AUTO_BUCKETS, "fused_tail", "false", False)
    # the fused tail needs whole parameters and measured its gain over the bf16 compute copy
    assert perf.resolve(PerfConfig(), CUDA, "fsdp").optimizer == "fused"
    assert perf.resolve(PerfConfig(bf16_weights=False), CUDA).optimizer == "fused"
    assert perf.resolve(PerfConfig(), CUDA, "ddp").optimizer == "fused_tail"
    cpu = perf.resolve(PerfConfig(), CPU)
    assert (cpu.bf16_weights, cpu.compile, cpu.token_buckets, cpu.optimizer) == (False, False, 0, "foreach")
    plain = perf.resolve(PerfConfig(preset="plain"), CUDA)
    assert (plain.bf16_weights, plain.compile, plain.token_buckets, plain.optimizer) == (False, False, 0, "foreach")
    assert perf.resolve(PerfConfig(), CUDA, "fsdp").bf16_weights is False  # FSDP keeps its own bf16 parameters
    assert "auto" not in perf.describe(cuda) and "auto" not in perf.describe(cpu)


def test_switches_set_by_hand_win_and_compile_implies_buckets():
    mine = perf.resolve(PerfConfig(bf16_weights=False, token_buckets=8, optimizer="fused_tail"), CUDA)
    assert (mine.bf16_weights, mine.compile, mine.token_buckets, mine.optimizer) == (False, True, 8, "fused_tail")
    assert perf.resolve(PerfConfig(compile=True), CPU).token_buckets == perf.AUTO_BUCKETS
    plain_but = perf.resolve(PerfConfig(preset="plain", compile=True), CUDA)
    assert (plain_but.compile, plain_but.token_buckets, plain_but.bf16_weights) == (True, perf.AUTO_BUCKETS, False)
    with pytest.raises(ConfigError, match="perf.token_buckets"):
        perf.resolve(PerfConfig(compile=True, token_buckets=0), CPU)
    with pytest.raises(ConfigError, match="perf.token_buckets"):
        load_config(None, ["perf.compile=true", "perf.token_buckets=0"])
    resolved = perf.resolve(PerfConfig(), CUDA)
    assert perf.resolve(resolved, CPU) == resolved  # resolving twice changes nothing, whatever the device


def test_the_run_records_the_resolved_switches(tiny_cfg, tmp_path):
    from ijepa_fast.training.trainer import Trainer

    cfg = dataclasses.replace(tiny_cfg)
    cfg.run.dir = str(tmp_path / "run")
    trainer = Trainer(cfg)
    want = dataclasses.asdict(perf.resolve(PerfConfig(), CPU))
    assert dataclasses.asdict(trainer.engine.perf) == want
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["perf"] == want
    log = (tmp_path / "run" / "train.log").read_text()
    assert "perf (resolved for cpu): " + perf.describe(trainer.engine.perf) in log


def _recording_backend(graphs: list):
    def backend(gm, example_inputs):
        sizes = [s for x in example_inputs if isinstance(x, torch.Tensor) for s in (*x.shape, *x.stride())]
        sizes += [x for x in example_inputs if isinstance(x, torch.SymInt)]
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                sizes += list(value.shape)
        graphs.append(any(isinstance(s, torch.SymInt) for s in sizes))
        return gm.forward
    return backend


@pytest.mark.parametrize("mode", ["reference", "default"])
def test_compile_runs_static_shapes_and_compiles_nothing_after_warm_up(mode, monkeypatch):
    """40 steps with compile on (a recording backend that runs the traced graphs eagerly: inductor
    would compile the same graphs, only slower on this CPU): every graph static, none after warm-up."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs: list[bool] = []
    monkeypatch.setattr(perf, "COMPILE_BACKEND", _recording_backend(graphs))
    torch.manual_seed(0)
    model = IJEPA.build("custom", img_size=32, patch_size=4, pred_depth=1, pred_dim=24, embed_dim=48, depth=2,
                        num_heads=3, attn="math")
    engine = Engine(model, Schedules(steps_per_epoch=20, epochs=2, warmup=0.5), mask=MaskConfig(mode=mode, min_keep=4),
                    seed=1, precision="fp32", perf=PerfConfig(compile=True))
    assert engine.perf.compile and engine.perf.token_buckets == perf.AUTO_BUCKETS
    shapes = engine.warm_up(4)
    warm = len(graphs)
    assert shapes >= 2 and warm >= 1
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    losses = [engine.step(images).loss for _ in range(40)]
    assert len(graphs) == warm, f"{len(graphs) - warm} graph(s) compiled after the warm-up"
    assert not any(graphs), "a block graph has symbolic sizes (dynamic shapes)"
    assert all(torch.isfinite(torch.tensor(losses)))
    torch._dynamo.reset()


def test_fp8_goes_through_torchao_except_target_over_the_fused_tail():
    """Which FP8 settings need torchao: every one but fp8=target over the fused tail (which 'auto'
    takes on CUDA), whose FP8 weights the tail writes."""
    assert perf.fp8_through_torchao(PerfConfig(fp8="target"), CUDA) is False
    assert perf.fp8_through_torchao(PerfConfig(fp8="target", optimizer="fused"), CUDA) is True
    assert perf.fp8_through_torchao(PerfConfig(fp8="target"), CPU) is True  # foreach AdamW on the CPU
    assert perf.fp8_through_torchao(PerfConfig(fp8="rowwise"), CUDA) is True
    assert perf.fp8_through_torchao(PerfConfig(), CUDA) is False
