"""The global batch: per-process batch and gradient accumulation derived from data.global_batch, the
world size and the micro-batch; errors that say what to set; the warning at another global batch."""
import random

import pytest
import torch
from conftest import run_cli

from ijepa_fast.config import load_config
from ijepa_fast.errors import ConfigError
from ijepa_fast.training.batching import batch_warning, plan_batch, with_plan


def _plan(world, *overrides):
    c = load_config("demo_cpu", list(overrides))
    return plan_batch(c.data, c.optim, world), c


def test_recipe_batch_on_one_process_is_128_micro_batches_of_16():
    plan, _ = _plan(1, "data.global_batch=2048", "data.batch_size=16")
    assert (plan.global_batch, plan.per_process, plan.micro_batch, plan.accum_steps) == (2048, 2048, 16, 128)
    plan16, _ = _plan(16, "data.global_batch=2048", "data.batch_size=128")  # the published run: no accumulation
    assert (plan16.per_process, plan16.micro_batch, plan16.accum_steps) == (128, 128, 1)


def test_plans_keep_the_global_batch_whatever_the_world():
    for _ in range(20):
        world = random.choice([1, 2, 4, 8, 16, 32])
        micro = random.choice([1, 2, 4, 8, 16, 32, 64, 128])
        plan, _ = _plan(world, "data.global_batch=2048", f"data.batch_size={micro}")
        assert plan.per_process * world == 2048 and plan.micro_batch * plan.accum_steps == plan.per_process
        assert plan.micro_batch == min(micro, 2048 // world)


def test_without_a_global_batch_as_before():
    plan, c = _plan(4, "data.batch_size=24", "optim.accum_steps=3")
    assert (plan.global_batch, plan.per_process, plan.micro_batch, plan.accum_steps) == (96, 24, 8, 3)
    assert with_plan(c, plan).data == c.data and with_plan(c, plan).optim == c.optim


def test_with_plan_is_the_step_in_per_process_terms():
    plan, c = _plan(2, "data.global_batch=256", "data.batch_size=32")
    run = with_plan(c, plan)
    assert (run.data.batch_size, run.optim.accum_steps, run.data.global_batch) == (128, 4, None)
    again = plan_batch(run.data, run.optim, 2)  # the copy plans to the same batches
    assert (again.global_batch, again.micro_batch, again.accum_steps) == (256, 32, 4)
    assert c.data.global_batch == 256 and c.data.batch_size == 32  # the settings as given are untouched


@pytest.mark.parametrize("world, overrides, what", [
    (3, ["data.global_batch=2048", "data.batch_size=16"], "multiple of 3 (e.g. 2046 or 2049)"),
    (1, ["data.global_batch=2048", "data.batch_size=48"], "data.batch_size to a divisor of 2048 (e.g. 32)"),
    (4, ["data.global_batch=2000", "data.batch_size=48"], "divisor of 500 (e.g. 25)"),
])
def test_batches_that_do_not_fit_say_what_to_set(world, overrides, what):
    with pytest.raises(ConfigError, match=what.replace("(", r"\(").replace(")", r"\)")):
        _plan(world, *overrides)


def test_accum_steps_is_derived_with_a_global_batch():
    with pytest.raises(ConfigError, match="optim.accum_steps.*derived from data.global_batch=2048"):
        load_config("demo_cpu", ["data.global_batch=2048", "optim.accum_steps=2"])
    with pytest.raises(ConfigError, match="data.global_batch: must be at least 1"):
        load_config("demo_cpu", ["data.global_batch=0"])


def test_warning_at_another_global_batch():
    plan, c = _plan(4, "data.batch_size=128", "optim.base_batch=2048")
    text = batch_warning(plan, c.optim)
    assert "global batch is 512" in text and "tuned for a global batch of 2048" in text
    assert "data.global_batch=2048" in text and "used as given" in text
    plan, c = _plan(4, "data.batch_size=128", "optim.base_batch=2048", "optim.lr_scaling=linear")
    assert "scaled linearly" in batch_warning(plan, c.optim)
    plan, c = _plan(4, "data.global_batch=2048", "data.batch_size=128", "optim.base_batch=2048")
    assert batch_warning(plan, c.optim) is None
    for name in ("in1k_vith14_ep300", "in1k_vitb16", "in22k_vitg16_ep44"):  # the recipes, on any GPU count
        c = load_config(name)
        assert c.data.global_batch == 2048
        assert batch_warning(plan_batch(c.data, c.optim, random.choice([1, 8, 16])), c.optim) is None


def test_demo_with_a_global_batch_trains_and_resumes(tmp_path):
    """data.global_batch=64 of micro-batches of 16 on one process: 4 micro-batches a step, the
    settings as given in config.yaml and the checkpoint, the warning at a batch other than the demo's."""
    run = tmp_path / "run"
    args = ["train", "--run-dir", run, "data.global_batch=64", "data.batch_size=16", "run.log_every=1",
            "run.monitor_every=0"]
    run_cli(*args, "--steps", "2", cwd=tmp_path)
    log = (run / "train.log").read_text()
    assert "global batch 64 = 64 x 1 process(es) (4 micro-batches each)" in log
    assert "tuned for a global batch of 32" in log
    assert "global_batch: 64" in (run / "config.yaml").read_text()
    ckpt = torch.load(run / "jepa-latest.pth.tar", weights_only=True)
    extra = ckpt["ijepa_fast"]
    assert extra["global_batch"] == 64 and extra["config"]["data"]["batch_size"] == 16
    run_cli(*args, "--steps", "3", cwd=tmp_path)
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "data.batch_size" not in log.split("resumed from")[-1]
    assert torch.load(run / "jepa-latest.pth.tar", weights_only=True)["ijepa_fast"]["step"] == 3
