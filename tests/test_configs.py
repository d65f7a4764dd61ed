"""The example configs under configs/ against the dataclasses they configure (issue 14).

Every example loads and validates. A reference config (its header says `# Every field is
listed`) is exactly what trainer/core/config_doc.py generates from its values and the
dataclass comments, so it lists every field and its comments are the dataclass's own: a
field added to a job fails here until the reference is regenerated with

    python tests/test_configs.py --rewrite configs/unet/sd21.yaml
"""
from __future__ import annotations

import dataclasses
import glob
import os
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lab.config import LabJob  # noqa: E402
from trainer.core.config import ConfigError, load_config  # noqa: E402
from trainer.core.config_doc import REFERENCE_MARK, commented_yaml, field_comments, regenerate  # noqa: E402
from trainer.slurm import job_class  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*", "*.yaml")))
JOBS = {"unet": job_class("unet"), "cache": job_class("cache"), "autoencoder": job_class("autoencoder"),
        "lab": LabJob}


def job_of(path: str):
    return JOBS[os.path.basename(os.path.dirname(path))]


def is_reference(path: str) -> bool:
    with open(path) as f:
        return REFERENCE_MARK in f.read()


def _nested_classes(cls):
    yield cls
    for f in dataclasses.fields(cls):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            yield from _nested_classes(type(value))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_example_config_loads_and_validates(path):
    try:
        load_config(job_of(path), path)
    except ConfigError as e:  # a file the config names on the user's machine (a VAE export, LPIPS weights)
        if "does not exist" not in str(e):
            raise


@pytest.mark.parametrize("path", [p for p in CONFIGS if is_reference(p)], ids=lambda p: os.path.relpath(p, ROOT))
def test_reference_configs_are_generated_from_the_dataclasses(path):
    with open(path) as f:
        text = f.read()
    assert text == regenerate(path, job_of(path)), (
        f"{os.path.relpath(path, ROOT)} differs from its dataclass (a field added, removed or re-commented): "
        f"run `python tests/test_configs.py --rewrite {os.path.relpath(path, ROOT)}`")


def test_each_job_has_a_reference_config():
    reference = {os.path.basename(os.path.dirname(p)) for p in CONFIGS if is_reference(p)}
    assert {"unet", "cache"} <= reference


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_field_has_a_comment(job):
    for cls in _nested_classes(JOBS[job]):
        comments = field_comments(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a comment: {missing}"


def test_a_reference_config_missing_a_field_is_caught(tmp_path):
    """The check can fail: drop one field (and its comment) from a generated reference."""
    cls = JOBS["unet"]
    cfg = load_config(cls, None, ["data.urls=x"])
    text = commented_yaml(cfg, f"{REFERENCE_MARK}\n")
    path = tmp_path / "unet" / "ref.yaml"
    path.parent.mkdir()
    path.write_text(text)
    assert regenerate(str(path), cls) == text
    assert yaml.safe_load(text) == yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg)))  # comments change nothing
    path.write_text("".join(line for line in text.splitlines(keepends=True) if not line.startswith("elastic_resume:")))
    assert regenerate(str(path), cls) != path.read_text()


if __name__ == "__main__":
    if sys.argv[1:2] != ["--rewrite"] or len(sys.argv) < 3:
        sys.exit("usage: python tests/test_configs.py --rewrite configs/JOB/NAME.yaml ...")
    for p in sys.argv[2:]:
        new = regenerate(p, job_of(os.path.abspath(p)))
        with open(p, "w") as f:
            f.write(new)
        print(f"rewrote {p}")
