"""launch/submit.py's batch scripts and the job configs behind them, with hostile and bad input.

No cluster is needed. Scripts are checked with `bash -n` and then run for real by bash with
stand-ins for SLURM's `srun`/`scontrol` and for the job's python/deepspeed (small shell
scripts that record their arguments), which shows what the shell made of every value.
"""
import json
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

from conftest import PY, ROOT, run_cmd, run_script
from trainer import slurm
from trainer.core.config import ConfigError, load_config
from trainer.unet.job import UNetJob

HOSTILE = ["$(touch {mark})", "`touch {mark}`", "x; touch {mark}", "a b 'c' \"d\" \\e", "&& touch {mark} #"]


def unet_cfg(overrides):
    return load_config(UNetJob, None, overrides)


def sbatch_block(text: str) -> list[str]:
    """The #SBATCH lines sbatch reads: those before the first line that is not a comment or blank."""
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    block = []
    for line in lines[1:]:
        if line.startswith("#SBATCH"):
            block.append(line)
        elif line.strip() and not line.startswith("#"):
            break
    assert len(block) == sum(ln.startswith("#SBATCH") for ln in lines), "an #SBATCH line after the first command"
    return block


# --- item 13: nothing from a value is executed, and #SBATCH lines hold only checked values ---------------------

@pytest.mark.parametrize("overrides, resources, message", [
    (["run_dir=/tmp/r\ntouch /tmp/pwned"], {}, r"config key 'run_dir' contains a control character \('\\n'\)"),
    (["run_dir=/tmp/r\r#SBATCH --x"], {}, r"config key 'run_dir' contains a control character"),
    (["run_dir=/tmp/$(touch x)"], {}, r"^run_dir: .* goes into an #SBATCH line.*found '\$'"),
    (["run_dir=/tmp/a b"], {}, r"^run_dir: .*found ' '"),
    (["run_dir=/tmp/`id`"], {}, r"^run_dir: .*found '`'"),
    (["run_dir=/tmp/r%j"], {}, r"^run_dir: .*found '%'"),
    ([], {"log_dir": "/tmp/l;touch x"}, r"^--log-dir: .*found ';'"),
    ([], {"log_dir": "/tmp/l\nx"}, r"^--log-dir: .*found '\\n'"),
    ([], {"partition": "gpu\n#SBATCH --x"}, r"^--partition='gpu\\n#SBATCH --x': expected partition names"),
    ([], {"partition": "gpu;touch x"}, r"^--partition="),
    ([], {"partition": "gpu,debug"}, None),
    ([], {"account": "a b"}, r"^--account='a b': expected an account name"),
    ([], {"account": "proj-1.x_y"}, None),
    ([], {"time": "1:00\ntouch x"}, r"^--time="),
    ([], {"time": "2 days"}, r"^--time='2 days': expected MM, MM:SS"),
    ([], {"time": "1:00:00:00"}, r"^--time="),
    ([], {"time": "$(id)"}, r"^--time="),
    *[([], {"time": t}, None) for t in ("30", "30:00", "12:00:00", "2-00", "2-00:30", "2-00:00:00", "UNLIMITED")],
    ([], {"sbatch": ["--qos=high --x"]}, r"^--sbatch='--qos=high --x': expected one sbatch option"),
    ([], {"sbatch": ["--qos=high\n#SBATCH --x"]}, r"^--sbatch="),
    ([], {"sbatch": ["--comment=$(id)"]}, r"^--sbatch="),
    ([], {"sbatch": ["--comment='a'"]}, r"^--sbatch="),
    ([], {"sbatch": ["-p gpu"]}, r"^--sbatch="),
    ([], {"sbatch": ["--no-requeue"]}, r"^--sbatch=--no-requeue: the script sets --requeue itself"),
    ([], {"sbatch": ["--signal=B:USR1@60"]}, r"the script sets --signal itself \(set it with --signal-seconds\)"),
    ([], {"sbatch": ["--out=/tmp/x"]}, r"the script sets --output itself"),  # sbatch takes abbreviations
    ([], {"sbatch": ["--qos=high", "--exclusive", "--constraint=a100&ib"]}, None),
], ids=lambda v: repr(v)[:40])
def test_hostile_values_are_refused_in_one_line(tmp_path, overrides, resources, message):
    overrides = ["data.urls=x", *overrides] + ([] if any(o.startswith("run_dir=") for o in overrides)
                                               else [f"run_dir={tmp_path}/run"])
    res = slurm.Resources(**resources)
    if message is None:  # values SLURM accepts still pass
        block = sbatch_block(slurm.sbatch_script("unet", None, overrides, res, unet_cfg(overrides)))
        assert "#SBATCH --signal=USR1@120" in block and "#SBATCH --requeue" in block
        return
    with pytest.raises(ConfigError, match=message) as e:
        slurm.sbatch_script("unet", None, overrides, res, unet_cfg(overrides))
    assert "\n" not in str(e.value)


def _stub(path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def stubs(tmp_path):
    """Stand-ins for srun and scontrol on PATH, and for the job's python and deepspeed (passed as
    `python`): each records its arguments NUL-separated, srun then runs the command it was given."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _stub(bin_ / "srun", 'printf "%s\\0" "$@" > "$REC/srun"\n'
                         'while [[ $# -gt 0 && $1 == --* ]]; do shift; done\nexec "$@"\n')
    _stub(bin_ / "scontrol", 'echo node1\n')
    for name in ("python", "deepspeed"):
        _stub(bin_ / name, f'printf "%s\\0" "$@" > "$REC/{name}"\npwd > "$REC/{name}.cwd"\n')
    rec = tmp_path / "rec"
    rec.mkdir()
    return bin_, rec


def run_sbatch_script(text: str, bin_, rec, tmp_path) -> None:
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    subprocess.run(["bash", "-n", str(path)], check=True)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "REC": str(rec), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NODEID": "0", "SLURM_ARRAY_TASK_ID": "1"}
    proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def recorded(rec, name) -> list[str]:
    return (rec / name).read_bytes().decode().split("\0")[:-1]


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_hostile_values_reach_the_job_verbatim_and_run_nothing(tmp_path, stubs, monkeypatch, launcher):
    bin_, rec = stubs
    mark = tmp_path / "pwned"
    hostile = [h.format(mark=mark) for h in HOSTILE]
    # The working directory and the config file's path are the user's too: hostile as well.
    cwd = tmp_path / hostile[0].replace("/", "_")
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = cwd / f"{hostile[1].replace('/', '_')}.yaml"
    config.write_text("data:\n  urls: x\n")
    overrides = [f"run_dir={hostile[0]}/run", f"validation_prompts={json.dumps(hostile[2:4])}",
                 f"wandb_project={hostile[4].replace('#', '').replace('/', '_')}"]
    cfg = load_config(UNetJob, str(config), overrides)
    assert cfg.validation_prompts == hostile[2:4]
    (tmp_path / "logs").mkdir()  # submit() makes it; the deepspeed launcher writes its hostfile there
    res = slurm.Resources(nodes=1, tasks_per_node=2, launcher=launcher, log_dir=str(tmp_path / "logs"))
    text = slurm.sbatch_script("unet", str(config), overrides, res, cfg, python=str(bin_ / "python"))
    block = sbatch_block(text)
    assert "#SBATCH --signal=USR1@120" in block and "#SBATCH --requeue" in block
    assert all(re.fullmatch(r"#SBATCH --[a-z-]+=?[A-Za-z0-9_./+,:@%-]*", line) for line in block), block
    run_sbatch_script(text, bin_, rec, tmp_path)
    assert not mark.exists()
    job = "deepspeed" if launcher == "deepspeed" else "python"
    argv = recorded(rec, job)
    assert argv[-6:] == [os.path.join(ROOT, "launch", "train_unet.py"), "--config", str(config), *overrides]
    assert (rec / f"{job}.cwd").read_text().strip() == str(cwd)
    assert not mark.exists()


def test_a_newline_in_run_dir_runs_no_command(tmp_path, stubs):
    """Before: the newline ended the #SBATCH --output line (and the header comment) and the rest
    of run_dir ran as a shell command; sbatch also stopped reading #SBATCH options there."""
    bin_, rec = stubs
    mark = tmp_path / "pwned"
    overrides = ["data.urls=x", f"run_dir={tmp_path}/r\ntouch {mark} #"]
    try:
        text = slurm.sbatch_script("unet", None, overrides, slurm.Resources(), unet_cfg(overrides),
                                   python=str(bin_ / "python"))
    except ConfigError as e:
        assert str(e) == "config key 'run_dir' contains a control character ('\\n'): not allowed"
    else:
        (tmp_path / "r\ntouch ").mkdir(parents=True, exist_ok=True)
        run_sbatch_script(text, bin_, rec, tmp_path)
    assert not mark.exists()


def test_the_cache_array_script_runs_its_slice(tmp_path, stubs, monkeypatch):
    from trainer.cache.job import CacheJob

    bin_, rec = stubs
    mark = tmp_path / "pwned"
    out = tmp_path / "latents"
    overrides = [f"data.urls={tmp_path}/$(touch {mark})", f"out_url={out}", "vae=identity"]
    cfg = load_config(CacheJob, None, overrides)
    text = slurm.sbatch_script("cache", None, overrides, slurm.Resources(array_tasks=2), cfg, num_shards=5,
                               python=str(bin_ / "python"))
    assert "#SBATCH --requeue" in sbatch_block(text) and "#SBATCH --array=0-1" in text
    run_sbatch_script(text, bin_, rec, tmp_path)
    assert recorded(rec, "python")[-4:] == [*overrides, "shard_slice=2:5"] and not mark.exists()


# --- item 14: stdout of submit.py --dry-run is the script alone -------------------------------------------------

def test_submit_dry_run_prints_only_the_script_on_stdout(tmp_path):
    proc = run_cmd([PY, "launch/submit.py", "--job", "unet", "--dry-run", "data.urls=x", f"run_dir={tmp_path}/run"],
                   timeout=300)
    assert proc.stdout.startswith("#!/bin/bash\n"), proc.stdout[:300]
    path = tmp_path / "job.sbatch"
    path.write_text(proc.stdout)
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert "#SBATCH --requeue" in sbatch_block(proc.stdout)
    assert "#SBATCH" not in proc.stderr


# --- item 15: bad values are refused when the config is resolved, in one line naming the key -------------------

# Each listed example, as the launch script that takes it, and whether the error names the key.
EXAMPLES = [
    ("unet", ["precision=bf32"], "precision must be one of auto, fp32, bf16, fp16, got 'bf32'"),
    ("unet", ["latent_norm=perchannel"], "latent_norm must be one of scaling_factor, per_channel, got 'perchannel' "
                                         "(did you mean 'per_channel'?)"),
    ("unet", ["model=sd3"], "model must be a UNet preset (tiny, demo, lab, sd15_narrow, sd15, sd21, sdxl, tiny_sdxl), a "
                            "transformer preset (sd3_medium, sd35_large, flux_dev, tiny_sd3, tiny_flux) or a diffusers "
                            "config.json"),
    ("unet", ["wandb=tensorboard"], "wandb must be one of offline, online, disabled, got 'tensorboard'"),
    ("unet", ["lr=-1"], "lr must be positive, got -1.0"),
    ("unet", ["data.num_workers=-3"], "data.num_workers must be >= 0, got -3"),
    ("cache", ["text_layer=second_last"], "text_layer must be one of last, penultimate, got 'second_last'"),
    ("cache", ["data.bucket_step=32"], "data.bucket_step is set but data.buckets is false"),
    ("cache", ["vae=/does/not/exist"], "vae=/does/not/exist: autoencoder path does not exist"),
    ("unet", ["lr_schedul=linear"], "unknown config key 'lr_schedul' (did you mean 'lr_schedule'?)"),
    ("autoencoder", ["presett=demo"], "unknown config key 'presett' (did you mean 'preset'?)"),
    ("autoencoder", ["lpips_weights=/no/vgg16.pth"], "lpips_weights=/no/vgg16.pth: LPIPS backbone file"),
]
BASE = {"unet": ["data.urls=x"], "cache": ["data.urls=x", "vae=identity"], "autoencoder": ["data.urls=x"]}
LAUNCH = {"unet": "launch/train_unet.py", "cache": "launch/cache_latents.py", "autoencoder": "launch/train_autoencoder.py"}


@pytest.mark.parametrize("entry", ["launch", "submit"])
@pytest.mark.parametrize("job, overrides, message", EXAMPLES, ids=[" ".join(e[1]) for e in EXAMPLES])
def test_bad_values_fail_the_dry_run_in_one_line(tmp_path, capfd, entry, job, overrides, message):
    out_key = "out_url" if job == "cache" else "run_dir"
    args = [*BASE[job], f"{out_key}={tmp_path}/out", *overrides]
    if entry == "launch":
        code, out, err = run_script(LAUNCH[job], ["--dry-run", *args], capfd)
    else:
        code, out, err = run_script("launch/submit.py", ["--job", job, "--dry-run", *args], capfd)
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


@pytest.mark.parametrize("script", ["launch/cache_latents.py", "launch/submit.py"])
def test_a_bad_value_is_one_line_from_a_real_process(script, tmp_path):
    args = ["--job", "cache"] if script.endswith("submit.py") else []
    proc = run_cmd([PY, script, *args, "--dry-run", "data.urls=x", f"out_url={tmp_path}/o", "vae=identity",
                    "text_layer=second_last"], check=False, timeout=300)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: text_layer must be one of last, penultimate, got 'second_last'"], proc.stderr


def test_good_values_still_resolve(tmp_path):
    from trainer.autoencoder.job import AutoencoderJob
    from trainer.cache.job import CacheJob

    (tmp_path / "unet.json").write_text("{}")
    (tmp_path / "vae").mkdir()
    load_config(UNetJob, None, ["data.urls=x", f"model={tmp_path}/unet.json", "latent_norm=per_channel",
                                "precision=fp16", "wandb=disabled", "data.endpoint_url=http://127.0.0.1:9000"])
    for vae in ("identity", "preset:tiny", "stabilityai/sd-vae-ft-mse", "org/name::vae", str(tmp_path / "vae")):
        load_config(CacheJob, None, ["data.urls=x", "out_url=o", f"vae={vae}", "text_layer=penultimate",
                                     "text_encoder=ViT-H-14:laion2b_s32b_b79k", "shard_slice=2:5"])
    load_config(AutoencoderJob, None, ["data.urls=x", "lpips_weights=random", "preset=vq_f8", "objective=vq_gan"])


@pytest.mark.parametrize("cls, override, message", [
    ("unet", "betas=[0.9, 1.5]", "betas must be two numbers in [0, 1)"),
    ("unet", "keep_last=0", "keep_last must be positive"),
    ("unet", "lr=nan", "config key 'lr' expects a finite float, got 'nan'"),
    ("unet", "model=/no/unet.json", "model=/no/unet.json: UNet config file /no/unet.json does not exist"),
    ("unet", "checkpoint_endpoint_url=minio:9000", "checkpoint_endpoint_url must be an http:// or https:// URL"),
    ("unet", "cache.resolution=-1", "cache.resolution must be >= 0"),
    ("unet", "data.max_error_rate=1.5", "data.max_error_rate must be in [0, 1]"),
    ("unet", "wandb_project=a/b", "wandb_project must be a non-empty name"),
    ("unet", "model=sd12", "(did you mean 'sd21'?)"),
    ("cache", "data.shuffle_buffer=10", "data.shuffle_buffer=10 is not used by the cache job"),
    ("cache", "precision=fp8", "precision must be one of auto, fp32, fp16, bf16"),
    ("cache", "vae=preset:tinyy", "unknown autoencoder preset; presets: tiny"),
    ("cache", "text_encoder=ViT-H-15", "unknown text encoder 'ViT-H-15'"),
    ("cache", "text_encoder=ViT-H-14:laion2b", "OpenCLIP has no pretrained tag 'laion2b' for ViT-H-14"),
    ("cache", "text_encoder=tiny:/no/t.safetensors", "text encoder weights file /no/t.safetensors does not exist"),
    ("cache", "shard_slice=1-2", "shard_slice must look like START:STOP"),
    ("cache", "data.resolution=0", "data.resolution must be positive"),
    ("autoencoder", "preset=sdd", "(did you mean 'sd'?)"),
    ("autoencoder", "disc_norm=layer", "disc_norm must be one of batch, group, none"),
    ("autoencoder", "lr=0", "lr must be positive"),
    ("autoencoder", "data.bucket_max_aspect=0.5", "data.bucket_max_aspect must be >= 1"),
])
def test_every_field_is_checked_when_resolved(cls, override, message):
    from trainer.autoencoder.job import AutoencoderJob
    from trainer.cache.job import CacheJob

    job = {"unet": UNetJob, "cache": CacheJob, "autoencoder": AutoencoderJob}[cls]
    with pytest.raises(ConfigError) as e:
        load_config(job, None, [*BASE[cls], "out_url=o" if cls == "cache" else "run_dir=r", override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_script_quoting_round_trips_through_the_shell():
    """shlex.quote is what the script relies on for every value on a shell line."""
    for value in HOSTILE:
        assert shlex.split(shlex.quote(value)) == [value]


@pytest.mark.parametrize("override, message", [
    ("models.kl_gan=/no/vae", "models.kl_gan=/no/vae: autoencoder path does not exist"),
    ("eval.hf_cutoff=1.5", "eval.hf_cutoff must be in (0, 1)"),
    ("eval.inception_weights=/no/inception.pth", "Inception weights file /no/inception.pth does not exist"),
    ("sampling.guidance=-1", "sampling.guidance must be >= 0"),
    ("cache.text_layer=last", "unknown config key 'cache.text_layer'"),
    ("cache.precision=fp8", "cache: precision must be one of auto, fp32, fp16, bf16"),
    ("unet.model=sd3", "unet.overrides: model must be a UNet preset"),
])
def test_the_lab_config_is_checked_too(override, message):
    from lab.config import LabJob

    with pytest.raises(ConfigError) as e:
        load_config(LabJob, os.path.join(ROOT, "configs/lab/tiny.yaml"), [override])
    assert message in str(e.value) and "\n" not in str(e.value)
