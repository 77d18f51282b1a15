import pytest
import yaml

from ijepa_fast.config import Config, ConfigError, config_dir, describe, load_config, parse_override

PUBLISHED = ["in1k_vith14_ep300", "in1k_vith16-448_ep300", "in22k_vith14_ep66", "in22k_vitg16_ep44"]
SIZES = ["in1k_vits16", "in1k_vitb16", "in1k_vitl16"]  # recipes from the literature (and ours where it has none)


def test_config_defaults_are_the_vith14_recipe():
    c = Config()
    assert (c.model.name, c.model.patch_size, c.model.pred_depth, c.model.pred_dim) == ("vit_huge", 14, 12, 384)
    assert (c.optim.lr, c.optim.start_lr, c.optim.final_lr, c.optim.warmup) == (1e-3, 2e-4, 1e-6, 40)
    assert c.optim.ema == (0.996, 1.0) and c.optim.loss == "smooth_l1" and c.optim.ema_schedule == "linear"
    assert c.data.crop_scale == (0.3, 1.0) and c.data.hflip is False and c.optim.grad_clip is None


@pytest.mark.parametrize("name,model,patch,crop,batch,epochs,warmup,pred_depth", [
    ("in1k_vith14_ep300", "vit_huge", 14, 224, 128, 300, 40, 12),
    ("in1k_vith16-448_ep300", "vit_huge", 16, 448, 16, 300, 40, 12),
    ("in22k_vith14_ep66", "vit_huge", 14, 224, 32, 66, 3, 12),
    ("in22k_vitg16_ep44", "vit_giant", 16, 224, 16, 44, 3, 16)])
def test_config_published_recipes(name, model, patch, crop, batch, epochs, warmup, pred_depth):
    c = load_config(name)
    assert (c.model.name, c.model.patch_size, c.data.crop_size, c.data.batch_size) == (model, patch, crop, batch)
    assert c.data.global_batch == c.optim.base_batch == 2048  # the recipe's batch on any number of GPUs
    assert (c.optim.epochs, c.optim.warmup, c.model.pred_depth) == (epochs, warmup, pred_depth)
    assert (c.optim.weight_decay, c.optim.final_weight_decay) == (0.04, 0.4)
    assert c.mask.mode == "reference" and c.mask.min_keep == 10  # the released sampler


@pytest.mark.parametrize("name,model,pred_depth,pred_dim,per_gpu,gpus", [
    ("in1k_vits16", "vit_small", 6, 192, 256, 8),
    ("in1k_vitb16", "vit_base", 6, 384, 256, 8),
    ("in1k_vitl16", "vit_large", 12, 384, 128, 16)])
def test_config_in1k_size_recipes(name, model, pred_depth, pred_dim, per_gpu, gpus):
    """The ViT-S/B/L recipes: their sizes, the StoP schedule, a global batch of 2048 as the header says, and a
    source named beside every model, data, mask and optim value."""
    import re

    c = load_config(name)
    assert (c.model.name, c.model.patch_size, c.model.pred_depth, c.model.pred_dim) == (model, 16, pred_depth, pred_dim)
    o = c.optim
    assert (o.epochs, o.warmup, o.start_lr, o.lr, o.final_lr) == (600, 15, 2e-4, 8e-4, 1e-4)
    assert (c.optim.weight_decay, c.optim.final_weight_decay, c.optim.ema) == (0.04, 0.4, (0.996, 1.0))
    assert c.data.batch_size == per_gpu and per_gpu * gpus == c.optim.base_batch == c.data.global_batch == 2048
    assert c.mask.mode == "reference" and c.data.hflip is False and c.optim.lr_scaling == "none"
    text = (config_dir() / f"{name}.yaml").read_text()
    assert f"global batch 2048 ({gpus} GPUs x {per_gpu})" in text.splitlines()[0]
    section = None
    for line in text.splitlines():
        if re.match(r"^\w+:", line):
            section = line.rstrip(":")
        elif (m := re.match(r"^  (\w+): ", line)) and section in ("model", "data", "mask", "optim"):
            if (section, m.group(1)) not in (("data", "source"), ("data", "path")):
                assert re.search(r"#.*(\[StoP\]|\[released\]|ours)", line), f"{name}: no source for {line.strip()!r}"


def test_config_seed_article_variant():
    c = load_config("seed_article_vith14")
    assert (c.optim.loss, c.optim.ema_schedule, c.data.hflip, c.optim.warmup) == ("mse", "cosine", True, 15)
    assert c.optim.start_lr == 0.0
    assert c.model.name == "vit_huge" and c.optim.epochs == 300  # the rest comes from its base


def test_config_overrides_and_types():
    c = load_config("demo_cpu", ["optim.lr=5e-4", "data.hflip=true", "optim.grad_clip=3",
                                 "mask.target_scale=[0.1, 0.2]",
                                 "run.max_steps=null"])
    assert c.optim.lr == 5e-4 and c.data.hflip is True and c.optim.grad_clip == 3.0
    assert c.mask.target_scale == (0.1, 0.2) and c.run.max_steps is None
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("override,loggers", [
    ("run.loggers=[jsonl,tensorboard]", ["jsonl", "tensorboard"]),
    ("run.loggers=[wandb, tensorboard]", ["wandb", "tensorboard"]),
    ("run.loggers=tensorboard", ["tensorboard"]),
    ("run.loggers=jsonl,wandb", ["jsonl", "wandb"]),
    ("run.loggers=[]", [])])
def test_config_loggers_list_overrides(override, loggers):
    assert Config().run.loggers == ["jsonl"]
    c = load_config("demo_cpu", [override])
    assert c.run.loggers == loggers
    assert yaml.safe_load(yaml.safe_dump(c.to_dict()))["run"]["loggers"] == loggers  # config.yaml round trip


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "'optim.lrr'.*did you mean 'lr'"),
    ("optimizer.lr=1", "'optimizer'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("data.batch_size=1.5", "data.batch_size: expected an integer"),
    ("mask.mode=random", "mask.mode: 'random' is not one of"),
    ("optim.ema=0.99", "optim.ema: expected a list of 2 values"),
    ("data.hflip=maybe", "data.hflip: expected true or false"),
    ("data.crop_size=225", "data.crop_size: 225 is not a multiple of model.patch_size"),
    ("nokey", "not of the form"),
    ("run.loggers=[jsonl,mlflow]", "run.loggers: 'mlflow' is not one of"),
    ("run.loggers=[tensorboard,tensorboard]", "run.loggers: names a logger twice"),
    ("run.loggers={a: 1}", "run.loggers: expected a list"),
    ("run.wandb_mode=cloud", "run.wandb_mode: 'cloud' is not one of"),
])
def test_config_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("demo_cpu", [override])


def test_config_yaml_errors_name_the_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  name: vit_base\n  widht: 3\n")
    with pytest.raises(ConfigError, match="'model.widht'"):
        load_config(p)
    p.write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def _reference_file(tmp_path, **changes):
    """A config in the reference implementation's layout (sections data/logging/mask/meta/optimization)."""
    data = {
        "data": {"batch_size": 64, "color_jitter_strength": 0.0, "crop_scale": [0.3, 1.0], "crop_size": 224,
                 "image_folder": "imagenet/", "num_workers": 4, "pin_mem": True, "root_path": "/datasets",
                 "use_color_distortion": False, "use_gaussian_blur": False, "use_horizontal_flip": False},
        "logging": {"folder": str(tmp_path / "logs"), "write_tag": "jepa"},
        "mask": {"allow_overlap": False, "aspect_ratio": [0.75, 1.5], "enc_mask_scale": [0.85, 1.0], "min_keep": 10,
                 "num_enc_masks": 1, "num_pred_masks": 4, "patch_size": 16, "pred_mask_scale": [0.15, 0.2]},
        "meta": {"copy_data": False, "load_checkpoint": False, "model_name": "vit_base", "pred_depth": 6,
                 "pred_emb_dim": 384, "read_checkpoint": None, "use_bfloat16": True},
        "optimization": {"ema": [0.996, 1.0], "epochs": 100, "final_lr": 1.0e-06, "final_weight_decay": 0.4,
                         "ipe_scale": 1.0, "lr": 0.001, "start_lr": 0.0002, "warmup": 15, "weight_decay": 0.04},
    }
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    p = tmp_path / "ref.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_config_reference_yaml_loads(tmp_path):
    c = load_config(_reference_file(tmp_path))
    assert (c.model.name, c.model.patch_size, c.model.pred_depth, c.data.batch_size) == ("vit_base", 16, 6, 64)
    assert c.data.path == "/datasets/imagenet/train" and c.run.dir == str(tmp_path / "logs")
    assert c.mask.mode == "reference" and c.optim.warmup == 15 and c.run.precision == "auto"
    assert c.mask.context_scale == (0.85, 1.0) and c.data.pin_memory is True


def test_config_reference_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="'meta.model_nam'"):
        load_config(_reference_file(tmp_path, meta__model_nam="vit_base"))
    with pytest.raises(ConfigError, match="color distortion is not implemented"):
        load_config(_reference_file(tmp_path, data__use_color_distortion=True))
    # a reference file loads, then our own overrides apply on top
    assert load_config(_reference_file(tmp_path), ["mask.mode=default"]).mask.mode == "default"


def test_config_every_builtin_loads_and_describe_documents_every_option():
    names = sorted(p.stem for p in config_dir().glob("*.yaml"))
    assert set(PUBLISHED + SIZES + ["demo_cpu", "seed_article_vith14"]) <= set(names)
    for n in names:
        load_config(n)
    text = describe()
    for key in ("optim.lr", "mask.mode", "model.init", "run.resume", "data.crop_scale"):
        line = next(li for li in text.splitlines() if li.startswith(key + " "))
        assert len(line.split(None, 2)) == 3  # key, default, documentation


def test_config_demo_runs_the_collapse_monitor_often_enough_to_compare():
    """The monitor's relative check compares with its first measurement: the demo measures several times."""
    from ijepa_fast.config import load_config

    cfg = load_config("demo_cpu")
    steps = cfg.optim.epochs * (cfg.data.demo_images // cfg.data.batch_size)
    assert cfg.run.monitor_every > 0 and steps // cfg.run.monitor_every >= 4


def test_config_describe_one_key_or_a_section(capsys):
    from ijepa_fast.cli import main
    from ijepa_fast.config import describe_option

    assert main(["config", "--describe", "optim.lr"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].split()[:2] == ["optim.lr", "0.001"] and "peak LR" in out[0]
    section = describe_option("data").splitlines()
    assert [line.split()[0] for line in section] == ["data." + f for f in Config().data.__dataclass_fields__]
    assert "data.global_batch" in describe_option("data.global_batch") and len(section) > 5
    assert main(["config", "--describe", "optim.lrr"]) == 2
    assert "unknown config key 'optim.lrr'; did you mean 'optim.lr'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="a section: data, dist, mask, model, optim, perf, run"):
        describe_option("nothing_like_it")
    assert main(["config", "--describe"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(describe().splitlines())
