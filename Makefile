# The two set-up commands of the README. Everything they need is installed here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo

.PHONY: demo demo-long test bench venv clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# Both stages of a latent diffusion model on the embedded synthetic data, on CPU.
# AE_ARGS / UNET_ARGS: overrides of configs/autoencoder/demo.yaml and configs/unet/demo.yaml.
demo: venv
	$(PY) launch/make_synthetic.py --out $(RUN)/shards --num 4000 --per-shard 500 --overwrite
	$(PY) launch/train_autoencoder.py --config configs/autoencoder/demo.yaml run_dir=$(RUN)/autoencoder data.urls=$(RUN)/shards $(AE_ARGS)
	$(PY) launch/cache_latents.py --config configs/cache/demo.yaml data.urls=$(RUN)/shards out_url=$(RUN)/latents vae=$(RUN)/autoencoder/export
	$(VENV)/bin/deepspeed --num_gpus 1 launch/train_unet.py --config configs/unet/demo.yaml run_dir=$(RUN)/unet data.urls=$(RUN)/latents $(UNET_ARGS)
	$(PY) launch/sample.py --run $(RUN)/unet --out $(RUN)/samples.png --guidance 3 \
		--prompt "a red circle at the center on a white background" \
		--prompt "a blue square at the top left on a black background" \
		--prompt "a green triangle at the bottom right on a white background" \
		--prompt "a yellow diamond at the top right on a light blue background" \
		--prompt "a purple circle at the bottom left on a gray background"
	@echo "samples:    $(RUN)/samples.png"
	@echo "loss curve: $(RUN)/unet/loss.png"

# The demo before #13 made it fast: the lab-sized autoencoder (32, 64, 64) and the 3M-parameter
# UNet, 3x the samples; sharper samples, about 15 minutes on 2 cores.
demo-long:
	$(MAKE) demo RUN=runs/demo-long \
		AE_ARGS="preset=demo total_samples=32000 lr=0.001 warmup_samples=2000 checkpoint_every_samples=8000" \
		UNET_ARGS="model=demo total_samples=102400 lr=0.001 warmup_samples=3200 ema_halflife_samples=5000 \
		zero_stage=2 checkpoint_every_samples=25600 validate_every_samples=51200"

test: venv
	$(PY) -m pytest -q tests

# The benchmarks (benchmarks/run_all.py; not part of test): about 13 minutes on a quiet 2-core CPU,
# writes benchmarks/RESULTS.md, each benchmark's JSON and report in runs/bench/.
bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
