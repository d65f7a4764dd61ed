"""Typed job configuration: a dataclass per job, filled from YAML plus `key.sub=value` overrides.

Every job in `launch/` goes through `parse_cli`, so all of them share the same rules:
unknown keys are errors that name the valid ones, overrides are converted to the field's
declared type, and the resolved config is written to the run directory, where a later run
with a different config is refused instead of silently mixing two experiments.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from typing import Any

import yaml

from trainer.core.errors import CheckpointError, ConfigError, LaunchError, TrainingError
from trainer.core.run_dir import claim_run_dir, holds_run_dir, release_run_dir  # noqa: F401 (re-exported)


def did_you_mean(word: str, options) -> str:
    """' (did you mean 'X'?)' for the option closest to a mistyped `word`, or ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_choice(key: str, value: str, choices) -> None:
    """`value` of config key `key` must be one of `choices` (a tuple, or a registry's keys)."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}"
                          f"{did_you_mean(value, choices)}")


def check_positive(cfg, keys, prefix: str = "") -> None:
    for key in keys:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{prefix}{key} must be positive, got {getattr(cfg, key)}")


def check_non_negative(cfg, keys, prefix: str = "") -> None:
    for key in keys:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{prefix}{key} must be >= 0, got {getattr(cfg, key)}")


WANDB_MODES = ("offline", "online", "disabled")  # RunLog's modes (trainer/core/metrics.py)


def check_endpoint(key: str, value: str | None) -> None:
    """An S3-compatible endpoint is an http(s) URL; anything else fails only when first used."""
    if value is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ConfigError(f"{key} must be an http:// or https:// URL, got {value!r}")


TRACKERS = ("wandb", "tensorboard", "none")  # where metrics go besides run_dir/log.jsonl (RunLog)


def check_wandb(cfg, project_key: str | None = None) -> None:
    check_choice("wandb", cfg.wandb, WANDB_MODES)
    check_choice("tracker", getattr(cfg, "tracker", "wandb"), TRACKERS)
    if project_key is not None:
        project = getattr(cfg, project_key)
        if not project or any(c in project for c in "/\\#?%:"):  # characters wandb refuses in a project name
            raise ConfigError(f"{project_key} must be a non-empty name without / \\ # ? % :, got {project!r}")


# A hub id (org/name, optionally ::subfolder) cannot be checked without the network; a value
# of another form (a leading / or ., more than one /) names a local path, which must exist.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(::[A-Za-z0-9._/-]+)?")


def looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.fullmatch(value)) and not value.startswith(".") and not os.path.exists(value)


def check_local_path(key: str, value: str, what: str = "path", kind: str = "any", path: str | None = None) -> None:
    """A local file or folder named in the config must exist when the config is resolved
    (on the login node for submit.py and --dry-run), not only after the job waited in the queue.
    kind: any | file | dir. `path`: the part of `value` that names it, where that is not all of it."""
    path = path if path is not None else value
    local = os.path.expanduser(path.removeprefix("file://"))
    if not {"file": os.path.isfile, "dir": os.path.isdir}.get(kind, os.path.exists)(local):
        want = {"file": "file", "dir": "folder"}.get(kind, "path")
        raise ConfigError(f"{key}={value}: {what} {want} {path} does not exist")


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
            out = tp(float(value) if isinstance(value, str) else value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {original!r}") from None
        if tp is float and not math.isfinite(out):  # nan and inf would pass every range check (nan < 0 is False)
            raise ConfigError(f"config key '{key}' expects a finite float, got {original!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        value = str(value)
        bad = _CONTROL.search(value)
        if bad:
            # A newline in run_dir would end an #SBATCH line and start a shell command in the
            # batch script; no path, URL, name or prompt of a config needs one.
            raise ConfigError(f"config key '{key}' contains a control character ({bad.group()!r}): not allowed")
        return value
    return value


# C0/C1 controls, DEL, and the Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _unknown_key(key: str, name: str, section: str, where: str, valid) -> ConfigError:
    """`key` as the user wrote it; `name` its segment that is not among `valid`, the keys of
    the section `section` ("" or "data.") that the message calls `where`."""
    if _CONTROL.search(key):  # the message stays one line
        key, name = repr(key)[1:-1], repr(name)[1:-1]
    close = difflib.get_close_matches(name, list(valid), n=1)
    hint = f" (did you mean '{section}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys in {where}: {', '.join(sorted(valid))}")


def _build(cls, data: dict, prefix: str = ""):
    types_ = _field_types(cls)
    unknown = sorted(str(k) for k in set(data) - set(types_))  # YAML keys may be numbers
    if unknown:
        raise _unknown_key(f"{prefix}{unknown[0]}", unknown[0], prefix, prefix.rstrip(".") or cls.__name__, types_)
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
            raise _unknown_key(dotted, part, "".join(p + "." for p in parts[:i]), where, types_)
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


def load_config(cls, path: str | None = None, overrides: list[str] = (), *, base=None, validate: bool = True):
    """Defaults of `cls` (or the `cls` instance `base`: a config built in code), then the YAML
    file, then `key=value` overrides; typed, and validated unless `validate` is False (a base
    that code completes before validating it)."""
    data, loaded = to_dict(cls() if base is None else base), {}
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
    given = {item.split("=", 1)[0].strip() for item in overrides}
    # One rule of precedence for every job (#27): the command line beats the config file, also where two
    # keys name the same thing (`pretrained=` and the file's `vae`, `text_encoder` or `model`): the file's
    # gives way to the command line's. Named together at one level, the job's validate() refuses them
    # unless they agree.
    for key, names_also in getattr(cls, "NAMES_ALSO", {}).items():
        if key in given:
            for other in names_also:
                if other in loaded and other not in given:
                    data[other] = to_dict(cls())[other]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        _set_path(data, cls, key.strip(), raw)
    cfg = _build(cls, data)
    if validate and hasattr(cfg, "validate"):
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


def save_resolved(cfg, run_dir: str, ignore: tuple[str, ...] = (), grow: tuple[str, ...] = (),
                  bound: bool = True, say=print, notes: dict[str, str] | None = None) -> str:
    """Claim `run_dir` (see claim_run_dir), then write `run_dir/config.yaml`; refuse a run directory
    that holds a different config.

    Rerunning the same command must resume, so an identical config is accepted. Keys in
    `ignore` may differ between runs; keys in `grow` (a total length) may grow, not shrink.
    `bound`: whether the run directory holds what that config trained (a checkpoint). A start that
    failed before its first checkpoint (a bad value found late) trained nothing: its config is
    replaced by the corrected command's, with a note, instead of locking the folder (#29).
    `notes`: a comment for top-level keys' lines (what a value means in this run), for the reader.
    """
    claim_run_dir(run_dir)
    path = os.path.join(run_dir, "config.yaml")
    new = to_dict(cfg)
    if os.path.exists(path):
        with open(path) as f:
            old = yaml.safe_load(f) or {}
        # A field added to the job since that run (absent from its file) had, in effect, the
        # default: only another value is a difference.
        _fill_missing(old, to_dict(type(cfg)()))
        diffs = [k for k in _diff_keys(old, new) if k not in ignore]
        shrunk = [k for k in diffs if k in grow and _get(new, k) < _get(old, k)]
        diffs = [k for k in diffs if k not in grow]
        if bound and shrunk:
            k = shrunk[0]
            raise ConfigError(f"{k} may grow on resume (the schedule continues to the new end), not shrink: "
                              f"{_get(old, k)!r} in {path}, {_get(new, k)!r} now")
        if bound and diffs:
            k = diffs[0]
            raise ConfigError(
                f"run directory {run_dir} holds a different config ({k}: {_get(old, k)!r} there, "
                f"{_get(new, k)!r} now); use a new run_dir or the same config"
            )
        if not bound and (diffs or shrunk):
            say(f"note: {path} was written by a start that made no checkpoint; replaced by this config "
                f"({(diffs or shrunk)[0]}: {_get(old, (diffs or shrunk)[0])!r} there, "
                f"{_get(new, (diffs or shrunk)[0])!r} now)")
    tmp = f"{path}.{os.getpid()}.tmp"
    text = dump(cfg)
    for key, note in (notes or {}).items():  # comments only: loading and comparing the file ignore them
        text = "\n".join(line + f"  # {' '.join(note.split())}" if line.startswith(f"{key}:") else line
                          for line in text.split("\n"))
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def _fill_missing(old: Any, defaults: dict) -> None:
    if not isinstance(old, dict):
        return
    for k, v in defaults.items():
        if k not in old:
            old[k] = v
        elif isinstance(v, dict):
            _fill_missing(old[k], v)


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


def parse_cli(cls, argv: list[str] | None = None, description: str = "", dry_run_checks=None):
    """The shared command line of every job: `--config FILE [--dry-run] [key=value ...]`.

    `--local_rank` is accepted and ignored because the `deepspeed` launcher appends it;
    ranks are read from the environment in `trainer.core.dist`. Returns the config, or exits
    after printing it for `--dry-run`, or exits with a one-line message on a config error.
    `dry_run_checks(cfg)`: what --dry-run also checks (the job's inputs, as a start checks them first).
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
        if dry_run_checks is not None:
            from data_pipeline.storage import DataError

            try:
                dry_run_checks(cfg)
            except (ConfigError, DataError, FileNotFoundError) as e:
                sys.exit(f"error: {one_line(e)}")
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


def exit_now(code: int = 0, message: str = "") -> None:
    """End a launch script's process: `message` (an error line) to stderr, then exit with `code` without
    the interpreter's own teardown of its modules, which takes about 2 s of CPU after a job that
    imported diffusers, transformers and DeepSpeed (measured on a 2-core machine: 1.9 s of a CPU-bound
    free of every object, after the last atexit handler). Non-daemon threads are joined and the atexit
    handlers run first (logging, weakref finalizers, wandb), so nothing that teardown would have done is
    lost. With LDM_FULL_EXIT=1 (tests that run a script in their own process) it is sys.exit."""
    import atexit
    import threading

    if os.environ.get("LDM_FULL_EXIT") == "1":
        sys.exit(message or code)
    if "tqdm" in sys.modules:  # a progress bar left open ends its line, as its finalizer would have
        for bar in list(getattr(sys.modules["tqdm"].tqdm, "_instances", ())):
            bar.close()
    if message:
        print(message, file=sys.stderr)
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(cls, job, description: str = "", dry_run_checks=None):
    """Entry point of a launch script: parse, then run `job(cfg)`; known input problems
    (bad config, unreadable data, missing weights) end as one line instead of a traceback."""
    from data_pipeline.storage import DataError

    cfg = parse_cli(cls, description=description, dry_run_checks=dry_run_checks)
    try:
        result = job(cfg)
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, TrainingError, LaunchError) as e:
        exit_now(1, f"error: {one_line(e)}")
    except RuntimeError as e:  # a peer rank died or hung: one line, not a traceback per rank
        from trainer.core.dist import lost_peer

        why = lost_peer(e)
        if why is None:
            raise
        exit_now(1, f"error: {why}")
    exit_now(0)
    return result
