"""The configuration: one tree of dataclasses, YAML files and dotted command-line overrides.

``load_config(path, overrides)`` starts from the defaults (``config_schema``), merges a YAML file (ours, or
one of the reference implementation's, recognised by its sections), then overrides such as
``optim.lr=5e-4``. Every key is checked: an unknown key or a value of the wrong type is an error
that names the key. ``describe()`` prints every option with its documentation, ``describe_option``
one key or section.

A YAML file may name another one with ``base: other.yaml`` (relative to itself, or a name in
the built-in ``configs/``); its values are applied first.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

from ..errors import ConfigError
from .reference import is_reference_config, translate_reference_config
from .schema import (
    Config,
    DataConfig,
    DistConfig,
    MaskConfig,
    ModelConfig,
    OptimConfig,
    PerfConfig,
    RunConfig,
    _plain,
)
from .validate import validate

__all__ = ["Config", "ConfigError", "DataConfig", "DistConfig", "MaskConfig", "ModelConfig", "OptimConfig",
           "PerfConfig", "RunConfig", "describe", "describe_option", "dump_config", "load_config"]


def _coerce(key: str, value, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:  # X | None, or X | Y: the first that fits
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) < len(args) and (value is None or (isinstance(value, str) and value.lower() in ("null", "none"))):
            return None
        for a in kinds[:-1]:
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        return _coerce(key, value, kinds[-1])
    if origin is list:  # a YAML list, or one name / comma-separated names on the command line
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        bad = isinstance(value, bool) or not isinstance(value, (int, str))
        if bad or (isinstance(value, str) and not _is_int(value)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported option type {tp}")


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def _unknown(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(known), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def merge(obj, values: dict, prefix: str = "") -> None:
    """Merge a nested dict into a config dataclass in place, checking every key and value."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = prefix + str(key)
        if key not in fields:
            raise _unknown(full, fields)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            merge(current, value, full + ".")
            continue
        aliases = fields[key].metadata.get("aliases")
        if aliases and isinstance(value, (bool, str)):
            value = aliases.get(value.lower() if isinstance(value, str) else value, value)
        new = _coerce(full, value, hints[key])
        choices = fields[key].metadata.get("choices")
        for item in (new if isinstance(new, list) else [new]):
            if choices and item not in choices:
                raise ConfigError(f"{full}: {item!r} is not one of {', '.join(map(repr, choices))}")
        setattr(obj, key, new)


def parse_override(text: str) -> dict:
    """'optim.lr=5e-4' -> {'optim': {'lr': 0.0005}} (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def read_yaml(path: Path, _seen=()) -> dict:
    """A YAML config as a dict in our layout (reference files are translated), bases resolved."""
    import yaml

    path = Path(path)
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file in UTF-8 (byte {e.start} is {e.object[e.start]:#04x}); save "
                          f"the config as UTF-8 YAML") from None
    except OSError as e:
        raise ConfigError(f"cannot read the config {path} ({e.strerror or e})") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    if is_reference_config(data):
        return translate_reference_config(data, path)
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base) if (path.parent / base).exists() else find_config(base)
    merged = read_yaml(base_path, _seen + (path,))
    _deep_update(merged, data)
    return merged


def _unique_key_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, (str, int, float, bool)):
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice (line {key_node.start_mark.line + 1}): keep one",
                        key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def config_dir() -> Path:
    """The built-in configs/ folder (installed with the package, or beside it in a checkout)."""
    here = Path(__file__).resolve().parents[1]  # the package folder, ijepa_fast/
    for cand in (here / "configs", here.parent / "configs"):
        if cand.is_dir():
            return cand
    raise ConfigError("the built-in configs/ folder is missing from this installation")


def find_config(name: str) -> Path:
    """A config path, or the name of a built-in config (with or without .yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    cand = config_dir() / f"{stem}.yaml"
    if cand.is_file():
        return cand
    names = sorted(q.stem for q in config_dir().glob("*.yaml"))
    raise ConfigError(f"config {name!r} not found: not a file, nor a built-in config ({', '.join(names)})")


def load_config(path=None, overrides=()) -> Config:
    """Defaults <- YAML file (optional) <- overrides, checked; see the module docstring."""
    cfg = Config()
    if path is not None:
        merge(cfg, read_yaml(find_config(str(path))))
    for text in overrides:
        merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


def describe(obj=None, prefix: str = "") -> str:
    """Every option, one per line: key, default, documentation."""
    obj = obj or Config()
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(describe(value, prefix + f.name + "."))
        else:
            choices = f.metadata.get("choices")
            extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
            lines.append(f"{prefix + f.name:26s} {_plain(value)!s:24s} {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines)


def describe_option(name: str) -> str:
    """The lines of ``describe()`` for one key (``optim.lr``) or every key under a section
    (``optim``, ``run``); a ConfigError naming close keys for a name that is neither."""
    lines = describe().splitlines()
    keys = [line.split(" ", 1)[0] for line in lines]
    name = name.strip().rstrip(".")
    hits = [line for line, key in zip(lines, keys) if key == name or key.startswith(name + ".")]
    if hits:
        return "\n".join(hits)
    sections = sorted({k.split(".", 1)[0] for k in keys})
    close = difflib.get_close_matches(name, keys + sections, n=3, cutoff=0.6)
    hint = (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else
            f"; give a key such as optim.lr or a section: {', '.join(sections)}")
    raise ConfigError(f"unknown config key {name!r}{hint}")


def dump_config(cfg: Config, path: Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
