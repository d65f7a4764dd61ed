"""Typed job configuration: a dataclass per job, filled from YAML plus `key.sub=value` overrides.

Every job in `launch/` goes through `parse_cli`, so all of them share the same rules:
unknown keys are errors that name the valid ones, overrides are converted to the field's
declared type, and the resolved config is written to the run directory, where a later run
with a different config is refused instead of silently mixing two experiments.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key or file at fault."""


class TrainingError(RuntimeError):
    """A run that stopped on purpose (diverged, too many bad steps), reported as one line."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value or a command-line string to type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}")
        original = value
        try:
            if tp is int and isinstance(value, str):
                try:
                    return int(value, 10)  # exact, also for integers beyond float precision
                except ValueError:
                    value = float(value)  # "1e5"
            if tp is int and float(value) != int(value):
                raise ValueError
            return tp(float(value) if isinstance(value, str) else value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {original!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys in "
            f"{prefix.rstrip('.') or cls.__name__}: {', '.join(sorted(types_))}"
        )
    kwargs = {name: _convert(data[name], types_[name], prefix + name) for name in data}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default is missing
        raise ConfigError(f"{cls.__name__}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_path(data: dict, cls, dotted: str, raw: str) -> None:
    """Apply one `a.b.c=value` override to the nested dict, validating each segment."""
    parts = dotted.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        types_ = _field_types(node_cls)
        if part not in types_:
            where = ".".join(parts[:i]) or node_cls.__name__
            raise ConfigError(f"unknown config key '{dotted}'; valid keys in {where}: {', '.join(sorted(types_))}")
        tp = types_[part]
        if i == len(parts) - 1:
            # Lists are written in YAML flow style; strings are kept verbatim (a shard pattern
            # like {000..009}.tar is not a YAML mapping).
            structured = typing.get_origin(tp) in (list, tuple, dict) or dataclasses.is_dataclass(tp)
            if structured and raw.strip()[:1] in ("[", "{"):
                try:
                    raw = yaml.safe_load(raw)
                except yaml.YAMLError as e:
                    raise ConfigError(f"config key '{dotted}': cannot parse {raw!r} ({str(e).splitlines()[0]})") from None
            node[part] = raw
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is not a section")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        node_cls = tp


def load_config(cls, path: str | None = None, overrides: list[str] = ()):
    """Defaults of `cls`, then the YAML file, then `key=value` overrides; validated and typed."""
    data = to_dict(cls())
    if path:
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        _merge(data, loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        _set_path(data, cls, key.strip(), raw)
    cfg = _build(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _merge(base: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg, run_dir: str, ignore: tuple[str, ...] = ()) -> str:
    """Write `run_dir/config.yaml`; refuse a run directory that holds a different config.

    Rerunning the same command must resume, so an identical config is accepted. Keys in
    `ignore` (e.g. a total length that may be extended) may differ between runs.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.yaml")
    new = to_dict(cfg)
    if os.path.exists(path):
        with open(path) as f:
            old = yaml.safe_load(f) or {}
        diffs = [k for k in _diff_keys(old, new) if k not in ignore]
        if diffs:
            k = diffs[0]
            raise ConfigError(
                f"run directory {run_dir} holds a different config ({k}: {_get(old, k)!r} there, "
                f"{_get(new, k)!r} now); use a new run_dir or the same config"
            )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(dump(cfg))
    os.replace(tmp, path)
    return path


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [prefix.rstrip(".")]


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def parse_cli(cls, argv: list[str] | None = None, description: str = ""):
    """The shared command line of every job: `--config FILE [--dry-run] [key=value ...]`.

    `--local_rank` is accepted and ignored because the `deepspeed` launcher appends it;
    ranks are read from the environment in `trainer.dist`. Returns the config, or exits
    after printing it for `--dry-run`, or exits with a one-line message on a config error.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file under configs/")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    if args.dry_run:
        print(dump(cfg), end="")
        sys.exit(0)
    return cfg


def one_line(e: BaseException) -> str:
    """The message of an input error as one line. Errors raised in DataLoader workers
    arrive with the worker's traceback folded into the message; keep only its last line."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def run(cls, job, description: str = ""):
    """Entry point of a launch script: parse, then run `job(cfg)`; known input problems
    (bad config, unreadable data, missing weights) end as one line instead of a traceback."""
    from data_pipeline.storage import DataError

    from .checkpoint import CheckpointError

    cfg = parse_cli(cls, description=description)
    try:
        return job(cfg)
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, TrainingError) as e:
        sys.exit(f"error: {one_line(e)}")
