"""The lab's sub-job configs, built as dataclasses, equal the ones it used to build from
`key=value` strings: every value the same, the overrides still on top, errors still named."""
from __future__ import annotations

import pytest

from lab.config import FIRST_STAGES, SPACES, LabJob, autoencoder_job, cache_job, stage_dir, train_urls, unet_job
from trainer.autoencoder.job import AutoencoderJob
from trainer.cache.job import CacheJob
from trainer.core import config as config_lib
from trainer.unet.job import UNetJob


# -- the sub-configs as the lab built them before: the lab's settings as key=value strings -------------
def _old_autoencoder_job(cfg: LabJob, name: str, urls: str) -> AutoencoderJob:
    a, d = cfg.autoencoder, cfg.data
    sets = [f"run_dir={stage_dir(cfg, 'autoencoders', name)}", f"data.urls={urls}",
            f"data.resolution={d.resolution}", f"data.num_workers={d.num_workers}",
            f"preset={a.vq_preset if name == 'vq_gan' else a.kl_preset}", f"latent_channels={a.latent_channels}",
            f"batch_per_rank={a.batch_size}", f"total_samples={a.total_samples}",
            f"warmup_samples={a.warmup_samples}", f"disc_start_samples={a.disc_start_samples}",
            f"lpips_net={a.lpips_net}", f"lpips_weights={a.lpips_weights}", f"log_every_samples={a.log_every_samples}",
            f"checkpoint_every_samples={a.checkpoint_every_samples}", f"seed={cfg.seed}", "wandb=disabled"]
    if d.endpoint_url:
        sets.append(f"data.endpoint_url={d.endpoint_url}")
    return config_lib.load_config(AutoencoderJob, getattr(a, f"{name}_config"), sets + list(a.overrides))


def _old_cache_job(cfg: LabJob, vae: str, space: str) -> CacheJob:
    d, c = cfg.data, cfg.cache
    sets = [f"data.urls={train_urls(cfg)}", f"data.resolution={d.resolution}", f"data.num_workers={d.num_workers}",
            f"out_url={stage_dir(cfg, 'latents', space)}", f"vae={vae}", f"text_encoder={c.text_encoder}",
            f"batch_size={c.batch_size}", f"precision={c.precision}"]
    if d.endpoint_url:
        sets.append(f"data.endpoint_url={d.endpoint_url}")
    return config_lib.load_config(CacheJob, None, sets)


def _old_unet_job(cfg: LabJob, space: str, cache_url: str) -> UNetJob:
    u = cfg.unet
    sets = [f"run_dir={stage_dir(cfg, 'unets', space)}", f"data.urls={cache_url}",
            f"data.num_workers={cfg.data.num_workers}", f"model={u.model}", f"batch_per_rank={u.batch_size}",
            f"total_samples={u.total_samples}", f"lr={u.lr}", f"warmup_samples={u.warmup_samples}",
            f"ema_halflife_samples={u.ema_halflife_samples}", f"zero_stage={u.zero_stage}",
            f"log_every_samples={u.log_every_samples}", f"checkpoint_every_samples={u.checkpoint_every_samples}",
            f"seed={cfg.seed}", "wandb=disabled"]
    return config_lib.load_config(UNetJob, None, sets + list(u.overrides))


@pytest.mark.parametrize("config", ["configs/lab/lab_cpu.yaml", "configs/lab/tiny.yaml"])  # lab_gpu names local weights
@pytest.mark.parametrize("extra", [[], ["data.endpoint_url=http://127.0.0.1:9", "seed=3", "unet.lr=0.0003",
                                        "unet.overrides=[lr_schedule=linear, data.shuffle_buffer=7]",
                                        "autoencoder.overrides=[lpips_weight=0.5, data.min_size=4, disc_layers=2]"]])
def test_sub_configs_equal_the_ones_built_from_strings(config, extra, tmp_path):
    cfg = config_lib.load_config(LabJob, config, [f"run_dir={tmp_path / 'lab'}", *extra])
    for name in FIRST_STAGES:
        assert autoencoder_job(cfg, name, train_urls(cfg)) == _old_autoencoder_job(cfg, name, train_urls(cfg)), name
    for space in SPACES:
        cache_url = stage_dir(cfg, "latents", space)
        assert unet_job(cfg, space, cache_url) == _old_unet_job(cfg, space, cache_url), space
    assert cache_job(cfg, "identity", "pixels") == _old_cache_job(cfg, "identity", "pixels")
    assert cache_job(cfg, "preset:tiny", "kl_gan") == _old_cache_job(cfg, "preset:tiny", "kl_gan")


def test_a_bad_override_is_still_one_line_naming_the_lab_section(tmp_path):
    for key, section in (("unet.overrides=[lr=fast]", "unet.overrides: config key 'lr' expects float"),
                         ("autoencoder.overrides=[bogus=1]", "autoencoder.kl_plain_config + autoencoder.overrides: "
                                                              "unknown config key 'bogus'")):
        with pytest.raises(config_lib.ConfigError, match=section.replace("[", r"\[").replace("+", r"\+")) as e:
            config_lib.load_config(LabJob, "configs/lab/tiny.yaml", [f"run_dir={tmp_path}", key])
        assert "\n" not in str(e.value)
