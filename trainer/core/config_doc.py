"""A config as YAML with each field's meaning, taken from the one place it is written: the
comment beside the field in its dataclass (continued on following `#   ` lines).

The reference configs (a header line `# Every field is listed`) are generated this way, so
that they cannot drift from the dataclasses (issue 14: a reference config had lost
three fields, and its copied comments had drifted); tests/test_configs.py checks them, and

    python tests/test_configs.py --rewrite configs/unet/sd21.yaml

rewrites one from its own values: the header comment is kept, every field is listed with
its current value (defaults filled in) and the dataclass's comment.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize

import yaml

REFERENCE_MARK = "# Every field is listed"


@functools.lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """Field name -> its comment, for a dataclass and the dataclasses it inherits from."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        comments: dict[int, str] = {}  # line -> comment text
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        lines = source.splitlines()
        body = ast.parse(source).body[0].body
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                text = comments.get(node.end_lineno, "")
                row = node.end_lineno + 1  # continuation lines: a comment alone on its line, `#   ...`
                while row in comments and lines[row - 1].lstrip().startswith("#   "):
                    text += " " + comments[row]
                    row += 1
                out[node.target.id] = text
    return out


def _value(v) -> str:
    text = yaml.safe_dump(v, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _lines(cfg, indent: str, width: int) -> list[str]:
    comments, out = field_comments(type(cfg)), []
    for f in dataclasses.fields(cfg):
        value, note = getattr(cfg, f.name), comments.get(f.name, "")
        if dataclasses.is_dataclass(value):
            out.append(f"{indent}{f.name}:".ljust(width) + f"  # {note}" if note else f"{indent}{f.name}:")
            out += _lines(value, indent + "  ", width)
            continue
        if isinstance(value, tuple):
            value = list(value)
        line = f"{indent}{f.name}: {_value(value)}"
        out.append(line.ljust(width) + f"  # {note}" if note else line)
    return out


def commented_yaml(cfg, header: str = "") -> str:
    """`cfg` as YAML (what `yaml.safe_load` reads back equals `dataclasses.asdict(cfg)`), each
    field followed by its dataclass comment."""
    width = min(48, max(len(ln.split("  # ")[0]) for ln in _lines(cfg, "", 0)) + 1)
    return header + "\n".join(_lines(cfg, "", width)) + "\n"


def header_of(text: str) -> str:
    """The comment lines before a YAML file's first key."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.strip() and not line.lstrip().startswith("#"):
            break
        out.append(line)
    return "".join(out)


def regenerate(path: str, cls) -> str:
    """The reference config `path` rewritten from its own values and the dataclass comments."""
    from trainer.core.config import load_config

    with open(path) as f:
        text = f.read()
    return commented_yaml(load_config(cls, path), header_of(text))
