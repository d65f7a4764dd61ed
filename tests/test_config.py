"""trainer/core/config.py: YAML + `key=value` overrides into typed dataclasses, and the run-dir guard."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import pytest
import yaml

from conftest import PY, ROOT, run_cmd
from trainer.autoencoder.job import AutoencoderJob
from trainer.cache.job import CacheJob
from trainer.core.config import release_run_dir, ConfigError, dump, load_config, save_resolved
from trainer.unet.job import UNetJob


@dataclasses.dataclass
class Section:
    urls: str = ""
    endpoint_url: Optional[str] = None
    workers: int = 1


@dataclasses.dataclass
class Job:
    run_dir: str = "runs/x"
    data: Section = dataclasses.field(default_factory=Section)
    steps: int = 10
    lr: float = 1e-4
    ema: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    note: Optional[str] = "hello"


JOB_KEYS = "betas, data, ema, lr, note, run_dir, steps"
SECTION_KEYS = "endpoint_url, urls, workers"


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


# -- unknown keys ----------------------------------------------------------------------------

def test_unknown_top_level_key_in_yaml_names_it_and_lists_valid_keys(tmp_path):
    path = write_yaml(tmp_path / "job.yaml", {"steps": 3, "stepz": 4})
    with pytest.raises(ConfigError) as e:
        load_config(Job, path)
    assert str(e.value) == f"unknown config key 'stepz' (did you mean 'steps'?); valid keys in Job: {JOB_KEYS}"


def test_unknown_nested_key_in_yaml_names_dotted_key(tmp_path):
    path = write_yaml(tmp_path / "job.yaml", {"data": {"urls": "a", "nope": 1}})
    with pytest.raises(ConfigError) as e:
        load_config(Job, path)
    assert str(e.value) == f"unknown config key 'data.nope'; valid keys in data: {SECTION_KEYS}"


def test_unknown_nested_key_in_override_names_dotted_key():
    with pytest.raises(ConfigError) as e:
        load_config(Job, None, ["data.nope=1"])
    assert str(e.value) == f"unknown config key 'data.nope'; valid keys in data: {SECTION_KEYS}"


def test_unknown_top_level_key_in_override():
    with pytest.raises(ConfigError) as e:
        load_config(Job, None, ["nope.deeper=1"])
    assert str(e.value) == f"unknown config key 'nope.deeper' (did you mean 'note'?); valid keys in Job: {JOB_KEYS}"


def test_unknown_key_close_to_a_valid_one_says_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown config key 'data.worker' \(did you mean 'data.workers'\?\); "):
        load_config(Job, None, ["data.worker=2"])
    path = write_yaml(tmp_path / "job.yaml", {"data": {"url": "x"}})
    with pytest.raises(ConfigError, match=r"^unknown config key 'data.url' \(did you mean 'data.urls'\?\); "):
        load_config(Job, path)
    path = write_yaml(tmp_path / "numbers.yaml", "1: x\nsteps: 2\n")  # a YAML key that is not a string
    with pytest.raises(ConfigError, match=r"^unknown config key '1'; valid keys in Job"):
        load_config(Job, path)


@pytest.mark.parametrize("override", ["run_dir=runs/x\ntouch /tmp/pwned", "note=a\rb", "data.urls=a\x00b",
                                      "note=\x1b[2J", "note=a\u2028b"])
def test_control_characters_in_strings_are_refused(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^config key '{key}' contains a control character \(.*\): not allowed$"):
        load_config(Job, None, [override])


def test_control_characters_in_yaml_strings_and_keys_are_refused(tmp_path):
    path = write_yaml(tmp_path / "job.yaml", 'run_dir: "runs/x\\n#SBATCH --x"\n')
    with pytest.raises(ConfigError, match=r"^config key 'run_dir' contains a control character \('\\n'\)"):
        load_config(Job, path)
    path = write_yaml(tmp_path / "key.yaml", '"run\\ndir": x\n')
    with pytest.raises(ConfigError) as e:
        load_config(Job, path)
    assert "\n" not in str(e.value) and "unknown config key 'run\\ndir'" in str(e.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused(value, tmp_path):
    with pytest.raises(ConfigError, match=rf"^config key 'lr' expects a finite float, got '{re.escape(value)}'$"):
        load_config(Job, None, [f"lr={value}"])
    path = write_yaml(tmp_path / "job.yaml", f"lr: .{value.lstrip('-')}\n")  # YAML's own .nan, .inf
    with pytest.raises(ConfigError, match=r"^config key 'lr' expects a finite float"):
        load_config(Job, path)


def test_override_into_non_section_and_without_equals_sign():
    with pytest.raises(ConfigError, match=r"^config key 'steps' is not a section$"):
        load_config(Job, None, ["steps.x=1"])
    with pytest.raises(ConfigError, match=r"^override 'steps' must look like key=value$"):
        load_config(Job, None, ["steps"])


def test_missing_and_invalid_config_files_are_named(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(Job, missing)
    assert str(e.value).startswith(f"cannot read config file {missing}: ")
    bad = write_yaml(tmp_path / "bad.yaml", "steps: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(Job, bad)
    assert str(e.value).startswith(f"config file {bad} is not valid YAML: ")
    listing = write_yaml(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(Job, listing)
    assert str(e.value) == f"config file {listing} must hold a mapping at the top level"


# -- typing of overrides -----------------------------------------------------------------------

def test_defaults_without_file_or_overrides():
    assert load_config(Job) == Job()


def test_override_typing():
    cfg = load_config(Job, None, ["steps=3", "lr=1e-3", "ema=false", "betas=[0.5, 0.9]", "note=none",
                                  "data.urls=s3://b/p/{000..009}.tar", "data.workers=4",
                                  "data.endpoint_url=http://127.0.0.1:9000"])
    assert cfg.steps == 3 and type(cfg.steps) is int
    assert cfg.lr == 0.001 and type(cfg.lr) is float
    assert cfg.ema is False
    assert cfg.betas == (0.5, 0.9) and type(cfg.betas) is tuple
    assert all(type(b) is float for b in cfg.betas)
    assert cfg.note is None
    assert cfg.data == Section(urls="s3://b/p/{000..009}.tar", endpoint_url="http://127.0.0.1:9000", workers=4)


@pytest.mark.parametrize("raw,expected", [("true", True), ("1", True), ("yes", True), ("ON", True),
                                          ("False", False), ("0", False), ("no", False), ("off", False)])
def test_bool_override_spellings(raw, expected):
    assert load_config(Job, None, [f"ema={raw}"]).ema is expected


def test_optional_and_tuple_variants():
    cfg = load_config(Job, None, ["note=null", "data.endpoint_url=NONE", "betas=0.1,0.2"])
    assert cfg.note is None and cfg.data.endpoint_url is None
    assert cfg.betas == (0.1, 0.2)
    cfg = load_config(Job, None, ["note=some text", "lr=2", "steps=1e3"])
    assert cfg.note == "some text"
    assert cfg.lr == 2.0 and type(cfg.lr) is float
    assert cfg.steps == 1000 and type(cfg.steps) is int


def test_later_override_wins_over_file_and_earlier_override(tmp_path):
    path = write_yaml(tmp_path / "job.yaml", {"steps": 5, "data": {"urls": "from-file", "workers": 2}})
    cfg = load_config(Job, path, ["steps=6", "steps=7", "data.workers=3"])
    assert cfg.steps == 7
    assert cfg.data == Section(urls="from-file", endpoint_url=None, workers=3)


@pytest.mark.parametrize("override,message", [
    ("steps=abc", "config key 'steps' expects int, got 'abc'"),
    ("steps=2.5", "config key 'steps' expects int, got '2.5'"),
    ("data.workers=abc", "config key 'data.workers' expects int, got 'abc'"),
    ("lr=fast", "config key 'lr' expects float, got 'fast'"),
    ("ema=maybe", "config key 'ema' expects true/false, got 'maybe'"),
    ("betas=[a, 0.9]", "config key 'betas[0]' expects float, got 'a'"),
    ("data=5", "config key 'data' is a section; expected a mapping, got '5'"),
])
def test_wrong_type_override_names_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(Job, None, [override])
    assert str(e.value) == message


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    path = write_yaml(tmp_path / "job.yaml", {"data": {"workers": "many"}})
    with pytest.raises(ConfigError) as e:
        load_config(Job, path)
    assert str(e.value) == "config key 'data.workers' expects int, got 'many'"
    path = write_yaml(tmp_path / "job2.yaml", {"steps": True})
    with pytest.raises(ConfigError) as e:
        load_config(Job, path)
    assert str(e.value) == "config key 'steps' expects int, got True"


def test_large_int_override_is_exact():
    # Integers beyond float precision (2**53) are not rounded on the way through.
    cfg = load_config(Job, None, ["steps=9007199254740993"])
    assert cfg.steps == 9007199254740993


def test_malformed_list_override_is_a_config_error_naming_the_key():
    # A typo in a YAML flow list is a one-line ConfigError naming the key, not a ParserError.
    with pytest.raises(ConfigError) as e:
        load_config(Job, None, ["betas=[0.5, 0.9"])
    assert "'betas'" in str(e.value)


def test_brace_pattern_override_of_a_string_key_is_kept_verbatim():
    assert load_config(Job, None, ["data.urls={000..002}.tar"]).data.urls == "{000..002}.tar"
    assert load_config(Job, None, ["data.urls={a,b}"]).data.urls == "{a,b}"


# -- YAML round trip ----------------------------------------------------------------------------

def test_dump_load_round_trip(tmp_path):
    cfg = load_config(Job, None, ["steps=3", "lr=1e-6", "ema=false", "betas=[0.5, 0.9]", "note=none",
                                  "data.urls=s3://b/{0..3}.tar", "data.endpoint_url=http://127.0.0.1:1"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump(cfg))
    again = load_config(Job, str(path))
    assert again == cfg
    assert type(again.betas) is tuple and again.note is None


@pytest.mark.parametrize("cls,config,overrides,expected", [
    (UNetJob, "configs/unet/demo.yaml", ["betas=[0.8, 0.95]", "data.endpoint_url=http://127.0.0.1:9"],
     {"betas": (0.8, 0.95), "data.endpoint_url": "http://127.0.0.1:9", "data.urls": "runs/demo/latents",
      "lr": 0.002, "weight_decay": 0.01}),
    (AutoencoderJob, "configs/autoencoder/demo.yaml", ["kl_weight=1e-5", "data.resolution=64"],
     {"kl_weight": 1e-5, "data.resolution": 64, "data.urls": "runs/demo/shards", "total_samples": 25600}),
    (CacheJob, "configs/cache/demo.yaml", ["out_endpoint_url=http://127.0.0.1:9", "batch_size=16", "vae={vae}"],
     {"out_endpoint_url": "http://127.0.0.1:9", "batch_size": 16, "vae": "{vae}", "data.resolution": 32}),
], ids=["unet", "autoencoder", "cache"])
def test_real_job_configs_round_trip(tmp_path, cls, config, overrides, expected):
    # The cache's vae must exist when the config is resolved: the demo's is made by an earlier stage.
    (tmp_path / "vae").mkdir()
    overrides = [o.format(vae=tmp_path / "vae") for o in overrides]
    expected = {k: v.format(vae=tmp_path / "vae") if isinstance(v, str) else v for k, v in expected.items()}
    cfg = load_config(cls, os.path.join(ROOT, config), overrides)
    for key, value in expected.items():  # the file's values and the overrides really arrived
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value and type(node) is type(value), key
    path = tmp_path / "dumped.yaml"
    path.write_text(dump(cfg))
    assert load_config(cls, str(path)) == cfg


def test_real_job_unknown_key_lists_its_fields():
    with pytest.raises(ConfigError) as e:
        load_config(UNetJob, None, ["data.urls=x", "data.resolution=32"])
    import dataclasses

    from trainer.core.data import LatentData

    valid = ", ".join(sorted(f.name for f in dataclasses.fields(LatentData)))
    assert "urls" in valid and "resolution" not in valid
    assert str(e.value) == f"unknown config key 'data.resolution'; valid keys in data: {valid}"


def test_real_job_validate_runs_after_overrides():
    with pytest.raises(ConfigError, match=r"^zero_stage must be 0, 1, 2 or 3, got 4$"):
        load_config(UNetJob, None, ["data.urls=x", "zero_stage=4"])
    with pytest.raises(ConfigError, match=r"^data.urls is empty"):
        load_config(AutoencoderJob)


# -- save_resolved ------------------------------------------------------------------------------

def test_save_resolved_same_config_twice(tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = load_config(Job, None, ["betas=[0.5, 0.9]", "note=none", "lr=1e-3"])
    path = save_resolved(cfg, run_dir)
    assert path == os.path.join(run_dir, "config.yaml")
    first = open(path).read()
    assert first == dump(cfg)
    assert save_resolved(load_config(Job, path), run_dir) == path
    assert open(path).read() == first
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "run.lock"]  # no temp file left (run.lock: run_dir.py)
    release_run_dir(run_dir)


def test_a_field_added_since_the_run_is_no_difference_at_its_default(tmp_path):
    """A run directory from before a field existed: the field was, in effect, at its default."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = dataclasses.asdict(load_config(Job, None, ["lr=1e-3"]))
    del old["note"], old["data"]["workers"]  # fields added since
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    save_resolved(load_config(Job, None, ["lr=1e-3"]), str(run_dir))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["note"] == "hello"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match=r"\(data.workers: 1 there, 3 now\)"):
        save_resolved(load_config(Job, None, ["lr=1e-3", "data.workers=3"]), str(run_dir))


def test_save_resolved_refuses_different_config(tmp_path):
    run_dir = str(tmp_path / "run")
    save_resolved(load_config(Job, None, ["lr=1e-3"]), run_dir)
    before = open(os.path.join(run_dir, "config.yaml")).read()
    with pytest.raises(ConfigError) as e:
        save_resolved(load_config(Job, None, ["lr=2e-3"]), run_dir)
    assert str(e.value) == (f"run directory {run_dir} holds a different config (lr: 0.001 there, 0.002 now); "
                            "use a new run_dir or the same config")
    with pytest.raises(ConfigError) as e:
        save_resolved(load_config(Job, None, ["lr=1e-3", "data.urls=other"]), run_dir)
    assert run_dir in str(e.value) and "(data.urls: '' there, 'other' now)" in str(e.value)
    assert open(os.path.join(run_dir, "config.yaml")).read() == before


def test_save_resolved_ignore_lets_listed_keys_differ(tmp_path):
    run_dir = str(tmp_path / "run")
    save_resolved(load_config(Job, None, ["steps=10"]), run_dir)
    save_resolved(load_config(Job, None, ["steps=20"]), run_dir, ignore=("steps",))
    assert yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))["steps"] == 20
    with pytest.raises(ConfigError, match=r"\(ema: True there, False now\)"):
        save_resolved(load_config(Job, None, ["steps=30", "ema=false"]), run_dir, ignore=("steps",))


# -- the command line ---------------------------------------------------------------------------

def test_dry_run_prints_resolved_yaml():
    proc = run_cmd([PY, "launch/train_autoencoder.py", "--config", "configs/autoencoder/demo.yaml",
                    "--dry-run", "batch_per_rank=7"], timeout=120)
    assert proc.returncode == 0
    assert "\nbatch_per_rank: 7\n" in proc.stdout
    printed = yaml.safe_load(proc.stdout)
    expected = load_config(AutoencoderJob, os.path.join(ROOT, "configs/autoencoder/demo.yaml"),
                           ["batch_per_rank=7"])
    assert printed == dataclasses.asdict(expected)
    assert printed["data"]["urls"] == "runs/demo/shards" and printed["total_samples"] == 25600


def test_unknown_key_on_command_line_is_one_line_error():
    proc = run_cmd([PY, "launch/train_autoencoder.py", "--config", "configs/autoencoder/demo.yaml",
                    "--dry-run", "data.nope=1"], check=False, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: unknown config key 'data.nope'; valid keys in data: ")
    assert "urls" in lines[0] and "resolution" in lines[0]
    assert proc.stdout == ""


def test_a_second_trainer_on_a_run_directory_is_refused_while_the_first_holds_it(tmp_path):
    """#27: two trainers in one run folder. The second is refused in one line naming the holder, before
    it reads or writes anything there; the folder is free again once the first process has ended."""
    import subprocess
    import sys

    from trainer.core import config as config_lib

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.core import config; "
                               f"config.claim_run_dir({str(run_dir)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(config_lib.ConfigError, match=rf"^run directory {run_dir} is in use by another trainer "
                                                         rf"\(pid {holder.pid} on .+\); wait for it to end"):
            config_lib.claim_run_dir(str(run_dir))
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    config_lib.claim_run_dir(str(run_dir))  # free once its holder is gone, however it ended
    config_lib.claim_run_dir(str(run_dir))  # and this process may claim it again
    config_lib.release_run_dir(str(run_dir))
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "run.lock").symlink_to(tmp_path / "elsewhere")  # a link where the lock goes: one line, nothing made
    with pytest.raises(config_lib.ConfigError, match=f"^cannot open {planted}/run.lock to hold the run directory"):
        config_lib.claim_run_dir(str(planted))
    assert not (tmp_path / "elsewhere").exists()


def test_one_rule_of_precedence_for_pretrained_and_the_encoders_it_names(tmp_path):
    """#27: `cache_latents pretrained=FOLDER` with a config file that sets vae/text_encoder silently used the
    file's encoders (and train_unet refused the cache later). The command line beats the file; named together
    at one level, pretrained= and an encoder are refused unless they name the same one."""
    import json

    from trainer.cache.job import CacheJob
    from trainer.unet.job import UNetJob

    folder = tmp_path / "sd"
    for part, files in (("vae", ("config.json", "diffusion_pytorch_model.safetensors")),
                        ("text_encoder", ("config.json", "model.safetensors")),
                        ("tokenizer", ("tokenizer_config.json", "tokenizer.json")),
                        ("unet", ("config.json", "diffusion_pytorch_model.safetensors")),
                        ("scheduler", ("scheduler_config.json",))):
        (folder / part).mkdir(parents=True)
        for name in files:
            (folder / part / name).write_text("{}")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    cache_file = tmp_path / "cache.yaml"
    cache_file.write_text("vae: preset:tiny\ntext_encoder: tiny\n")
    base = [f"data.urls={tmp_path}/shards", f"out_url={tmp_path}/out"]
    cfg = load_config(CacheJob, str(cache_file), [*base, f"pretrained={folder}"])
    assert (cfg.vae, cfg.text_encoder) == ("", "") and cfg.vae_spec() == str(folder / "vae")
    with pytest.raises(ConfigError, match=rf"^vae=preset:tiny and pretrained={folder} both name the vae"):
        load_config(CacheJob, str(cache_file), [*base, f"pretrained={folder}", "vae=preset:tiny"])
    both = tmp_path / "both.yaml"
    both.write_text(f"pretrained: {folder}\ntext_encoder: tiny\n")
    with pytest.raises(ConfigError, match=rf"^text_encoder=tiny and pretrained={folder} both name the text encoder"):
        load_config(CacheJob, str(both), base)
    agree = load_config(CacheJob, None, [*base, f"pretrained={folder}", f"vae={folder}/vae/"])  # its own: fine
    assert agree.vae_spec() == f"{folder}/vae/"
    unet_file = tmp_path / "unet.yaml"
    unet_file.write_text("model: sd15\n")
    assert load_config(UNetJob, str(unet_file), ["data.urls=x", f"pretrained={folder}"]).model == UNetJob.model
    with pytest.raises(ConfigError, match="both name the UNet"):
        load_config(UNetJob, str(unet_file), ["data.urls=x", f"pretrained={folder}", "model=sd15"])


def test_a_run_directory_held_from_another_host_is_waited_for_then_refused(tmp_path, capsys):
    """A holder on another host may be a crashed node whose lock the file server has not expired yet: the job
    SLURM requeued waits (here 1 s) before refusing; a holder that lets go during the wait is not waited out."""
    import subprocess
    import sys

    from trainer.core import run_dir as rd

    run_dir = tmp_path / "run"
    script = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1] + '/run.lock', os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, b'pid 1 on node-that-crashed\\n', 0); "
              "print('held', flush=True); time.sleep(float(sys.argv[2]))")
    run_dir.mkdir()
    for hold_s, refused in ((60, True), (2.5, False)):
        holder = subprocess.Popen([sys.executable, "-c", script, str(run_dir), str(hold_s)], stdout=subprocess.PIPE,
                                  text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            if refused:
                with pytest.raises(ConfigError, match=r"in use by another trainer \(pid 1 on node-that-crashed\)"):
                    rd.claim_run_dir(str(run_dir), other_host_wait_s=1)
            else:
                rd.claim_run_dir(str(run_dir), other_host_wait_s=30)  # the holder lets go after 2.5 s
                rd.release_run_dir(str(run_dir))
            assert "waiting up to" in capsys.readouterr().out
        finally:
            holder.kill()
            holder.wait()
