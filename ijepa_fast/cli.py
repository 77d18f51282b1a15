"""The ``ijepa-fast`` command.

    ijepa-fast train [CONFIG] [section.key=value ...] [--data DIR]   train (no CONFIG: the CPU demo)
    ijepa-fast config [CONFIG] [section.key=value ...] [--describe [NAME]]  the resolved config / what options mean
    ijepa-fast export CHECKPOINT OUT [--format safetensors|timm|hf --which target|encoder]   export an encoder
    ijepa-fast import SRC OUT.pth.tar [--format timm|hf]   a timm / transformers encoder as a checkpoint
    ijepa-fast bench [CONFIG] [section.key=value ...] [--repeats 3 --model vit_huge --batch 128 ...]   time the step
    ijepa-fast bench --suite FILE.yaml [section.key=value ...] [--out NAME]   a list of configs timed, one page
    ijepa-fast bench --report A.jsonl B.jsonl [--out NAME]   runs of several cards or commits compared
    ijepa-fast extract CHECKPOINT --data DIR [--img 224 --layers 4 --tokens --out F]   features of a frozen encoder
    ijepa-fast probe {linear,attentive,knn,lowshot} --train T --val V [--checkpoint C]   probe accuracy
    ijepa-fast shard DIR OUT [--size 1GB --max-images N --seed S]   an image folder as tar shards

CONFIG is a YAML path or the name of a built-in config (``ijepa-fast config --list``).

Exit status: see ``EXIT_HELP`` (also at the end of ``ijepa-fast --help``).
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import ConfigError, DataError, IJEPAFastError, MachineError, TrainingStopped

DEFAULT_CONFIG = "demo_cpu"

# exit statuses: a finished command 0; a stop on a signal 128 + the signal's number (as a shell reports it)
EXIT_MACHINE, EXIT_USER, EXIT_NONFINITE = 1, 2, 3
EXIT_SIGNAL = {"SIGINT": 130, "SIGUSR1": 138, "SIGTERM": 143}
EXIT_HELP = """exit status:
  0    finished
  1    a failure of the machine (a full disk, an I/O error) or an unexpected error
  2    a user error: one line on stderr says what to change; nothing was written
  3    training stopped on a non-finite loss or gradient (the last good checkpoint is intact)
  130  stopped by Ctrl-C (SIGINT): the step in flight finished and a checkpoint was written
  138  stopped by SIGUSR1, with a checkpoint
  143  stopped by SIGTERM, with a checkpoint
"""


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    config, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise ConfigError(f"unexpected argument {a!r}: give one CONFIG and section.key=value overrides")
    return config, overrides


def _load(args) -> tuple[object, str]:
    from pathlib import Path

    from .config import load_config

    config, overrides = _split(args.args)
    extra = []
    if getattr(args, "data", None):
        extra += ["data.source=folder", f"data.path={args.data}"]
        if config is None:  # the demo decodes nothing; real images are decoded in worker processes
            extra.append("data.num_workers=8")
    if getattr(args, "run_dir", None):
        extra.append(f"run.dir={args.run_dir}")
    if getattr(args, "device", None):
        extra.append(f"run.device={args.device}")
    if getattr(args, "steps", None) is not None:
        if args.steps < 1:
            raise ConfigError(f"--steps: must be at least 1, got {args.steps} (leave it out to train the whole run)")
        extra.append(f"run.max_steps={args.steps}")
    name = config or DEFAULT_CONFIG
    cfg = load_config(name, extra + overrides)
    return cfg, Path(name).stem


def cmd_train(args) -> int:
    import os
    import shlex
    import time

    from .runlog.output import Heartbeat
    from .training.run_folder import written_since
    from .training.trainer import Trainer, run_trainer

    t0 = time.time()
    first = os.environ.get("RANK", "0") == "0"
    if first:  # before torch is imported: seconds on a busy machine
        print("ijepa-fast train: setting up", file=sys.stderr, flush=True)
    argv = [a for a in args.argv if a != "--force"]  # the command that continues the run needs no --force
    with Heartbeat(every=4.0, enabled=first) as beat:  # never silent for long: set-up, slow steps, the end
        cfg, name = _load(args)
        if not cfg.run.progress:
            beat.stop()
        trainer = Trainer(cfg, name, resume_command="ijepa-fast " + " ".join(shlex.quote(str(a)) for a in argv),
                          force=args.force)
        run_dir = run_trainer(trainer)
    print(f"run folder: {run_dir}")
    files = written_since(run_dir, t0)
    if files and first:
        print(f"files written ({len(files)}):")
        for rel, size in files:
            print(f"  {rel:40s} {_size(size)}")
    if trainer.stopped_by:
        return EXIT_SIGNAL.get(trainer.stopped_by, EXIT_SIGNAL["SIGTERM"])
    return 0


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def _positive(value, flag: str, *, zero: bool = False) -> None:
    """``--flag`` must be at least 1 (0 allowed with ``zero``)."""
    low = 0 if zero else 1
    if value is not None and value < low:
        raise ConfigError(f"{flag}: must be at least {low}, got {value}")


def _new_output(out, force: bool, siblings=()) -> None:
    """An output path that exists is replaced only with --force; its folder must be creatable."""
    from pathlib import Path

    out = Path(out)
    taken = [p for p in (out, *siblings) if p.exists() or p.is_symlink()]
    if taken and not force:
        raise ConfigError(f"{taken[0]} already exists: pass --force to replace it, or choose another output path")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write {out}: {parent} is not writable; choose another output path")


def cmd_config(args) -> int:
    import yaml

    from .config import config_dir, describe, describe_option

    if args.list:
        for p in sorted(config_dir().glob("*.yaml")):
            first = p.read_text().splitlines()[0].lstrip("# ") if p.read_text() else ""
            print(f"{p.stem:28s} {first}")
        return 0
    if args.describe is not None:
        print(describe_option(args.describe) if args.describe else describe())
        return 0
    cfg, _ = _load(args)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from .interop.export import export_encoder

    _positive(args.num_heads, "--num-heads")
    if args.format == "safetensors" and Path(args.out).suffix != ".safetensors":
        raise ConfigError(f"{args.out}: --format safetensors writes a .safetensors file; name it "
                          f"{Path(args.out).with_suffix('.safetensors').name}, or choose --format timm or hf")
    if args.format != "safetensors" and Path(args.out).suffix == ".safetensors":
        raise ConfigError(f"{args.out}: --format {args.format} writes a folder, not a .safetensors file")
    _check_input(args.checkpoint, "checkpoint")
    _new_output(args.out, args.force)
    print(export_encoder(args.checkpoint, args.out, format=args.format, which=args.which, num_heads=args.num_heads)[1])
    return 0


def cmd_import(args) -> int:
    from pathlib import Path

    from .interop.importer import import_encoder

    for flag in ("num_heads", "pred_depth", "pred_dim", "pred_heads"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    heads = args.pred_heads
    if heads and args.pred_dim % heads:
        raise ConfigError(f"--pred-heads {heads} does not divide --pred-dim {args.pred_dim}")
    if not str(args.out).endswith((".pth.tar", ".pth", ".pt")):
        raise ConfigError(f"{args.out}: the checkpoint import writes is a .pth.tar file; name it so")
    if not Path(args.src).exists():
        raise ConfigError(f"{args.src} does not exist: give a timm state dict file or folder, or a transformers "
                          f"IJepaModel folder")
    _new_output(args.out, args.force)
    print(import_encoder(args.src, args.out, format=args.format, num_heads=args.num_heads, pred_depth=args.pred_depth,
                         pred_dim=args.pred_dim, pred_heads=args.pred_heads, seed=args.seed)[1])
    return 0


def cmd_bench(args) -> int:
    if args.report:
        return _bench_report(args)
    config, overrides = _split(args.args)
    for flag in ("patch", "img", "batch", "pred_depth", "steps", "repeats"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    _positive(args.warmup, "--warmup", zero=True)
    if args.suite:
        if config:
            raise ConfigError(f"bench --suite {args.suite}: the suite names its configs; drop {config!r} (KEY=VALUE "
                              f"overrides apply to every entry)")
        _check_input(args.suite, "suite")
        if args.device:
            _device(args)
        from .bench.command import run_suite_file

        return run_suite_file(args, overrides)
    from .bench.command import shortcut_overrides
    from .config import load_config
    from .models import VIT_SIZES

    if args.model and args.model not in VIT_SIZES:
        raise ConfigError(f"--model {args.model}: choose one of {', '.join(sorted(VIT_SIZES))}")
    patch = args.patch or (None if config else 14 if (args.model or "vit_huge") == "vit_huge" else 16)
    if args.img and patch and args.img % patch:
        raise ConfigError(f"--img {args.img}: not a multiple of the patch size {patch} "
                          f"(e.g. {patch * (args.img // patch or 1)})")
    if args.batch and args.batch > 4096:
        raise ConfigError(f"--batch {args.batch}: more than 4096 images per step will not fit one device; lower it")
    cfg = load_config(config, [*shortcut_overrides(args, config), *overrides])  # a bad CONFIG or override: one line
    if cfg.data.batch_size > 4096:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: bench times one device's step, and more than 4096 "
                          f"images will not fit one; lower it")
    if args.device:
        device = _device(args)
    else:
        from .training.setup import resolve_device

        device = resolve_device(cfg.run.device)
    from .bench.command import run_config

    return run_config(args, cfg, device, config, overrides)


def _check_input(path, what: str) -> None:
    from pathlib import Path

    if not Path(path).exists():
        raise ConfigError(f"{what} {path} does not exist")


def _bench_report(args) -> int:
    """``bench --report A.jsonl B.jsonl ...``: runs of several cards or commits on one page and chart."""
    from .bench.compare import merge_reports, write_report

    rows = merge_reports(args.report)
    if not rows:
        raise ConfigError(f"--report: no rows in {', '.join(args.report)}")
    paths = write_report(rows, args.out or "bench-report", title="Benchmark runs compared",
                         command="ijepa-fast " + " ".join(args.argv))
    print(f"{len(rows)} rows of {len({r['run'] for r in rows})} run(s) -> " + ", ".join(map(str, paths.values())))
    return 0


def _encoder(args):
    """The checkpoint's encoder, read once per command (probe uses it for both splits); ``args.img``
    defaults to the resolution it was trained at."""
    from .checkpoint.format import encoder_from_checkpoint

    if getattr(args, "encoder", None) is None:
        args.encoder = encoder_from_checkpoint(args.checkpoint, args.which, args.num_heads)
        if args.img is None:
            args.img = args.encoder.patch_size * args.encoder.grid[0]
    return args.encoder


def _device(args):
    from .training.setup import resolve_device

    return resolve_device(args.device or "auto", setting="--device")


def _encoder_args_check(args) -> None:
    _positive(args.img, "--img")
    _positive(args.batch, "--batch")
    _positive(args.workers, "--workers", zero=True)
    _positive(args.num_heads, "--num-heads")
    _device(args)


def cmd_extract(args) -> int:
    from pathlib import Path

    from .data import open_images
    from .eval import extract, save

    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ConfigError(f"--out {args.out}: write features as .safetensors or .npy")
    _encoder_args_check(args)
    _check_input(args.checkpoint, "checkpoint")
    siblings = [out.with_name(out.stem + s) for s in ("_labels.npy", "_tokens.npy", "_meta.json")] \
        if out.suffix == ".npy" else []
    _new_output(out, args.force, siblings)
    images = open_images(args.data)
    enc = _encoder(args)
    if args.img % enc.patch_size:
        raise ConfigError(f"--img {args.img}: not a multiple of the encoder's patch size {enc.patch_size}")
    feats = extract(enc, images, img=args.img, batch_size=args.batch, device=_device(args),
                    tokens=args.tokens, num_workers=args.workers, layers=args.layers)
    if len(feats) == 0:
        raise DataError(f"none of the {len(images)} images of {args.data} could be decoded (all unusable, e.g. "
                        f"{feats.meta['skipped'][0] if feats.meta['skipped'] else '?'}): nothing written")
    feats.meta.update({"checkpoint": str(args.checkpoint), "which": args.which})
    out = save(feats, args.out)
    skipped = feats.meta["skipped"]
    print(f"{len(feats)} images ({len(skipped)} unusable, skipped) -> {out}: features {tuple(feats.features.shape)}"
          + (f", tokens {tuple(feats.tokens.shape)}" if feats.tokens is not None else ""))
    return 0


def _features(args, which: str, tokens: bool, classes=None):
    """Features of the train or val split: a features file, or an image folder with --checkpoint."""
    from pathlib import Path

    from .data import open_images
    from .eval import extract, load

    given = getattr(args, which)
    if not given and not args.data:
        raise ConfigError(f"probe needs --{which} (features or an image folder) or --data DIR holding {which}/")
    path = Path(given or Path(args.data) / which)
    if not path.exists():
        raise DataError(f"{path} does not exist: give a features file (from extract) or an image folder")
    if path.is_file():
        feats = load(path)
    else:
        if not args.checkpoint:
            raise DataError(f"{path} is a folder: pass --checkpoint to extract its features")
        images = open_images(path)
        enc = _encoder(args)
        if args.img % enc.patch_size:
            raise ConfigError(f"--img {args.img}: not a multiple of the encoder's patch size {enc.patch_size}")
        feats = extract(enc, images, img=args.img, batch_size=args.batch, device=_device(args),
                        tokens=tokens, num_workers=args.workers, layers=args.layers)
        if len(feats) == 0:
            raise DataError(f"none of the images of {path} could be decoded")
    if tokens and feats.tokens is None:
        raise DataError(f"the attentive probe needs patch tokens: extract {path} with --tokens")
    if classes is not None and feats.meta.get("classes"):  # the same class names -> the same label numbers
        mapping = {name: i for i, name in enumerate(classes)}
        missing = [c for c in feats.meta["classes"] if c not in mapping]
        if missing:
            raise DataError(f"{which} has classes the train split lacks: {missing[:5]}")
        remap = {i: mapping[c] for i, c in enumerate(feats.meta["classes"])}
        feats.labels = feats.labels.apply_(lambda v: remap.get(v, v))
    return feats


def cmd_probe(args) -> int:
    import json

    from .eval import attentive_probe, knn_probe, linear_probe, lowshot

    tokens = args.kind == "attentive"
    _encoder_args_check(args)
    _positive(args.epochs, "--epochs")
    _positive(args.k, "--k")
    _positive(args.per_class, "--per-class")
    if args.percent is not None and not 0 < args.percent <= 100:
        raise ConfigError(f"--percent {args.percent}: must be in (0, 100]")
    try:
        seeds = tuple(int(s) for s in args.seeds.split(","))
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
    if args.kind == "lowshot" and args.per_class is None and args.percent is None:
        raise ConfigError("lowshot needs --per-class N or --percent P")
    train = _features(args, "train", tokens)
    val = _features(args, "val", tokens, train.meta.get("classes") or None)
    if (train.labels < 0).any() or (val.labels < 0).any():
        raise DataError("probes need labels: use folders with one sub-folder per class (ImageNet layout)")
    _check_compatible(train, val, tokens)
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"the {'train' if len(train) == 0 else 'val'} features hold no image")
    if args.kind == "knn" and args.k > len(train):
        raise ConfigError(f"--k {args.k}: more neighbours than the {len(train)} training features")
    if args.kind == "linear":
        res = linear_probe(train.features, train.labels, val.features, val.labels, epochs=args.epochs)
    elif args.kind == "knn":
        res = knn_probe(train.features, train.labels, val.features, val.labels, k=args.k)
    elif args.kind == "attentive":
        res = attentive_probe(train.tokens, train.labels, val.tokens, val.labels)
    else:
        res = lowshot(train.features, train.labels, val.features, val.labels, args.per_class, args.percent, seeds,
                      epochs=args.epochs)
    res.update({"train_images": len(train), "val_images": len(val)})
    res = _rounded(res)
    print(json.dumps(res))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
    if args.md:
        spread = f" ± {res['top1_std']:.2f}" if "top1_std" in res else ""
        with open(args.md, "a") as f:
            f.write(f"| {args.kind} | {len(train)} | {len(val)} | {res['top1']:.2f}{spread} | {res['top5']:.2f} |\n")
    return 0


def _check_compatible(train, val, tokens: bool) -> None:
    """Train and val features must come from the same encoder: the same width (an error) and,
    normally, the same resolution (a warning)."""
    a, b = (train.tokens, val.tokens) if tokens else (train.features, val.features)
    if a.shape[-1] != b.shape[-1]:
        layers = (train.meta.get("layers", 1), val.meta.get("layers", 1))
        raise DataError(f"train features are {a.shape[-1]} wide but val features {b.shape[-1]}: extract both splits "
                        f"with the same checkpoint" + (f" and --layers (here {layers[0]} and {layers[1]})"
                                                       if layers[0] != layers[1] else ""))
    ia, ib = train.meta.get("img"), val.meta.get("img")
    if ia and ib and ia != ib:
        print(f"warning: train features were extracted at {ia} px and val features at {ib} px; probe accuracy is "
              f"usually lower across resolutions", file=sys.stderr)


def _rounded(x):
    """Floats to 4 decimals (no float32 noise in the output)."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def cmd_shard(args) -> int:
    from .data.shards import run_command

    _positive(args.max_images, "--max-images")
    return run_command(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="ijepa-fast", description="I-JEPA pretraining engine.", epilog=EXIT_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"ijepa-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (with no CONFIG: the built-in CPU demo)",
                       description="Train from CONFIG (a YAML path or built-in name; default: demo_cpu) with "
                                   "section.key=value overrides, e.g. optim.lr=5e-4 data.batch_size=64. A run "
                                   "folder that holds a run is continued; starting it over or rewinding it needs "
                                   "--force. The first Ctrl-C finishes the step, checkpoints and exits 130; SIGTERM "
                                   "exits 143 and SIGUSR1 138, also with a checkpoint.",
                       epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                   help="a YAML file or built-in config (default demo_cpu), then section.key=value overrides")
    t.add_argument("--data", metavar="DIR", help="train on an image folder (ImageNet layout or flat)")
    t.add_argument("--run-dir", metavar="DIR", help="run folder (resumes from its latest checkpoint if any)")
    t.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    t.add_argument("--steps", type=int, help="stop after this many steps")
    t.add_argument("--force", action="store_true",
                   help="start over in (or rewind) a run folder that holds a run: its files move to "
                        "<run>/previous-<time>/, nothing is deleted")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="print the resolved config, list built-in configs or describe every option")
    c.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                   help="a YAML file or built-in config (default demo_cpu), then section.key=value overrides")
    c.add_argument("--describe", nargs="?", const="", metavar="NAME",
                   help="an option's default and meaning (NAME: a key such as optim.lr, or a section such as optim; "
                        "without NAME: every option)")
    c.add_argument("--list", action="store_true", help="the built-in configs")
    c.add_argument("--data", metavar="DIR", help="as train --data: the image folder to train on")
    c.set_defaults(func=cmd_config)

    e = sub.add_parser("export", help="export an encoder of a checkpoint: safetensors, timm or transformers layout")
    e.add_argument("checkpoint", help="a checkpoint: ours, a published one, a sharded <tag>-latest.dcp or a Lightning "
                                        ".ckpt of IJEPAModule")
    e.add_argument("out", help="the .safetensors file (format safetensors) or the folder (timm, hf) to write")
    e.add_argument("--format", default="safetensors", choices=("safetensors", "timm", "hf"),
                   help="one file with timm's key names; a timm folder (config.json, model.safetensors); a "
                        "transformers IJepaModel folder (config.json, model.safetensors, preprocessor_config.json)")
    e.add_argument("--which", default="target", choices=("target", "encoder", "target_encoder"),
                   help="the EMA target encoder (the paper's choice, default) or the context encoder (the one the "
                        "public timm / transformers conversions take)")
    e.add_argument("--num-heads", type=int, help="head count, only for published checkpoints of a non-standard width")
    e.add_argument("--force", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="a timm or transformers I-JEPA encoder as a checkpoint (fresh predictor)")
    im.add_argument("src", help="a timm state dict file or folder, or a transformers IJepaModel folder")
    im.add_argument("out", help="the checkpoint to write (.pth.tar): encoder = target encoder = the imported weights")
    im.add_argument("--format", default="auto", choices=("auto", "timm", "hf"),
                    help="auto: hf for a folder whose config.json has model_type ijepa, else timm")
    im.add_argument("--num-heads", type=int, help="head count, if the source omits it (non-standard widths)")
    im.add_argument("--pred-depth", type=int, default=12, help="blocks of the fresh predictor (model.pred_depth)")
    im.add_argument("--pred-dim", type=int, default=384, help="width of the fresh predictor (model.pred_dim)")
    im.add_argument("--pred-heads", type=int, help="heads of the fresh predictor (default: the encoder's)")
    im.add_argument("--seed", type=int, default=0, help="seed of the predictor's initialisation")
    im.add_argument("--force", action="store_true", help="replace OUT if it exists")
    im.set_defaults(func=cmd_import)

    b = sub.add_parser("bench", help="time the training step: images/s, tokens/s, TFLOP/s, MFU, memory, GPU-hours",
                       description="Times the training step `ijepa-fast train CONFIG` runs (built by the same "
                                   "assembler) on synthetic images, one JSON object per line: the median images/s of "
                                   "--repeats timed windows and their spread, with the card, versions, commit and a "
                                   "hash of the config. A row's batch is one device's step of data.batch_size images; "
                                   "with data.global_batch, one of the global_batch / batch_size devices of the "
                                   "recipe. Without CONFIG the flags below build one. --suite times a list of configs "
                                   "and writes JSON lines, CSV, markdown and a PNG chart; --report merges runs.",
                       epilog=EXIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                   help="a YAML file or built-in config, then section.key=value overrides (with --suite: overrides "
                        "for every entry)")
    b.add_argument("--suite", metavar="FILE.yaml", help="time every entry of a suite file (e.g. "
                   "benchmarks/suites/recipes.yaml), each in its own try; writes --out NAME.jsonl, .csv, .md, .png")
    b.add_argument("--model", help="vit_tiny .. vit_giant (model.name; without CONFIG: vit_huge)")
    b.add_argument("--patch", type=int, help="model.patch_size (without CONFIG: 14 for vit_huge, else 16)")
    b.add_argument("--img", type=int, help="image side in pixels, data.crop_size (without CONFIG: 224)")
    b.add_argument("--batch", type=int, help="images per step on one device, data.batch_size (without CONFIG: the "
                                             "published per-GPU batch of the model)")
    b.add_argument("--pred-depth", type=int, help="predictor blocks, model.pred_depth (without CONFIG: 12)")
    b.add_argument("--masks", choices=("reference", "default", "both"),
                   help="the released sampler's masks, whole contexts (default mode), or both (without CONFIG: "
                        "both; with CONFIG: the config's mask.mode)")
    b.add_argument("--paths", choices=("plain", "fast", "both"),
                   help="the step as configured (fast: every perf switch 'auto'), the plain step, or both (without "
                        "CONFIG: both; with CONFIG: fast)")
    b.add_argument("--fp8", choices=("rowwise", "tensorwise"),
                   help="a variant with FP8 encoder linear layers (perf.fp8; CUDA compute capability >= 8.9)")
    b.add_argument("--perf", action="append", default=[], metavar="KEY=VALUE",
                   help="a perf.* setting of an extra variant, repeatable (e.g. --perf optimizer=fused_tail)")
    b.add_argument("--steps", type=int, default=10, help="timed steps per window")
    b.add_argument("--repeats", type=int, default=3, help="timed windows: the row reports their median and spread")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    b.add_argument("--device", help="cuda, cuda:N or cpu (default: run.device, CUDA when present)")
    b.add_argument("--out", help="also append the JSON lines to this file (with --suite or --report: the files' name "
                                 "without suffix; default: the suite's name, or bench-report)")
    b.add_argument("--report", nargs="+", metavar="RUN.jsonl",
                   help="time nothing: merge the JSON lines of runs on several cards or commits into one page and "
                        "chart (.jsonl, .csv, .md, .png), side by side, with the released step's rows where present")
    b.set_defaults(func=cmd_bench)

    def encoder_args(q):
        q.add_argument("--which", default="target_encoder", choices=("target_encoder", "encoder"),
                       help="the EMA target encoder (the paper's choice) or the context encoder")
        q.add_argument("--num-heads", type=int, help="only for non-standard widths in published checkpoints")
        q.add_argument("--img", type=int, help="resolution; default: the one the checkpoint was trained at (other "
                       "sizes interpolate the positional table)")
        q.add_argument("--batch", type=int, default=64, help="images per forward pass")
        q.add_argument("--layers", type=int, default=1, metavar="N",
                       help="features: the average-pooled outputs of the last N blocks, concatenated (N x the width; "
                            "4 = the paper's linear probe protocol; default 1, the pooled output)")
        q.add_argument("--workers", type=int, default=2, help="image-decoding worker processes")
        q.add_argument("--device", help="cuda or cpu (default: cuda when present; bf16 there)")

    x = sub.add_parser("extract", help="features of a frozen encoder over an image folder",
                       description="Average-pooled features (optionally every patch token), with labels and file "
                                   "names, as .safetensors or .npy.")
    x.add_argument("checkpoint", help="a checkpoint: ours, a published one, a sharded <tag>-latest.dcp or a Lightning "
                                        ".ckpt of IJEPAModule")
    x.add_argument("--data", required=True, metavar="DIR", help="an image folder (class sub-folders or flat)")
    x.add_argument("--tokens", action="store_true", help="also keep every patch token")
    x.add_argument("--out", default="features.safetensors", help=".safetensors or .npy (with _labels.npy beside)")
    x.add_argument("--force", action="store_true", help="replace the --out file(s) if they exist")
    encoder_args(x)
    x.set_defaults(func=cmd_extract)

    pr = sub.add_parser("probe", help="linear, attentive, kNN or low-shot probe accuracy",
                        description="TRAIN and VAL are feature files (from extract) or image folders (with "
                                    "--checkpoint); --data DIR means DIR/train and DIR/val. Prints top-1/top-5 "
                                    "as JSON.")
    pr.add_argument("kind", choices=("linear", "attentive", "knn", "lowshot"), help="the probe")
    pr.add_argument("--train", help="training features (from extract) or an image folder (with --checkpoint)")
    pr.add_argument("--val", help="validation features or an image folder")
    pr.add_argument("--data", metavar="DIR", help="a folder with train/ and val/ (ImageNet layout)")
    pr.add_argument("--checkpoint", help="extract the features of image folders from this checkpoint")
    pr.add_argument("--epochs", type=int, default=100, help="training epochs of the linear and low-shot probes")
    pr.add_argument("--k", type=int, default=20, help="neighbours (knn)")
    pr.add_argument("--per-class", type=int, help="labels per class (lowshot)")
    pr.add_argument("--percent", type=float, help="percent of each class's labels (lowshot)")
    pr.add_argument("--seeds", default="0,1,2", help="lowshot seeds")
    pr.add_argument("--out", help="also append the JSON to this file")
    pr.add_argument("--md", help="also append a Markdown table row (kind | train | val | top-1 | top-5)")
    encoder_args(pr)
    pr.set_defaults(func=cmd_probe)

    sh = sub.add_parser("shard", help="write an image folder as webdataset-style tar shards",
                        description="Tar shards of an image folder (class sub-folders or flat) with an index, for "
                                    "data.path; see docs/training.md.")
    sh.add_argument("folder", metavar="DIR", help="the image folder")
    sh.add_argument("out", metavar="OUT", help="a new or empty folder for the shards")
    sh.add_argument("--size", default="1GB", help="largest shard, e.g. 500MB, 1GB, 2GiB (default 1GB)")
    sh.add_argument("--max-images", type=int, help="only the first N images of the folder's order")
    sh.add_argument("--seed", type=int, default=0, help="seed of the order the samples are stored in")
    sh.add_argument("--force", action="store_true", help="write into OUT even if it holds files (earlier shards "
                    "there are replaced)")
    sh.set_defaults(func=cmd_shard)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    # overrides may follow options (train CONFIG --data D optim.lr=1e-4): collect the stray ones
    args, rest = parser.parse_known_args(argv)
    stray = [a for a in rest if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if rest:
        args.args = list(getattr(args, "args", [])) + rest
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except MachineError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_MACHINE
    except IJEPAFastError as e:  # a user error: one line that says what to change
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted at once (a second Ctrl-C, or one during set-up): the steps since the last checkpoint are "
              "lost" if args.command == "train" else "interrupted (Ctrl-C): no output was written", file=sys.stderr)
        return EXIT_SIGNAL["SIGINT"]
    except OSError as e:  # the machine's file system, said plainly
        code, text = _os_error(e)
        print(f"error: {text}", file=sys.stderr)
        return code
    except MemoryError:
        print("error: out of memory: lower the batch size or the image size", file=sys.stderr)
        return EXIT_MACHINE
    except Exception as e:  # not foreseen: still one line; IJEPA_FAST_DEBUG=1 shows the traceback
        if os.environ.get("IJEPA_FAST_DEBUG"):
            raise
        print(f"error: unexpected {type(e).__name__}: {_one_line(e)} (run with IJEPA_FAST_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_MACHINE


def _one_line(e: BaseException) -> str:
    """The message on one line; an error re-raised from a data-loader worker keeps only its own message."""
    text = str(e)
    if "Original Traceback" in text:  # torch's wrapper: "Caught X in DataLoader worker ... Traceback ... X: msg"
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(type(e).__name__) else last
    return " ".join(text.split()) or type(e).__name__


def _os_error(e: OSError) -> tuple[int, str]:
    """(exit status, message) of an OSError: a full disk or an I/O error is the machine's (1), a path
    that cannot be read or written the user's (2)."""
    import errno

    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return EXIT_MACHINE, f"the disk is full{where}: free some space and run again"
    if e.errno == errno.EIO:
        return EXIT_MACHINE, f"an input/output error of the disk{where}"
    return EXIT_USER, f"{e.strerror or _one_line(e)}{where}"


if __name__ == "__main__":
    sys.exit(main())
