"""models/caption_classifier.py and lab/caption_classifier.py: a small CNN that reads the
attributes of a synthetic image, trained in seconds, and caption accuracy against prompts."""
from __future__ import annotations

import collections
import json
import os
import time

import pytest
import torch

from data_pipeline import shards, synthetic
from data_pipeline.storage import DataError
from models.caption_classifier import CONFIG, WEIGHTS, load_classifier
from lab.caption_classifier import BASE_HEADS, SyntheticSet, caption_accuracy, synthetic_images, train_classifier

RES, STEPS, WIDTH = 16, 300, 16
ALL = tuple(synthetic.TEXTURES)
# Background textures at 16 px: every kind of head, a texture head included, trained in a few
# seconds on one CPU thread. Shape textures need 32 px and ~1500 steps (trainer docstring).
TRAIN = SyntheticSet(seed=0, num=2048, background_textures=ALL)
HELD_OUT = SyntheticSet(seed=1, num=512, background_textures=ALL)


def as_model_input(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div(127.5).sub(1.0)


def prompts_of(data: SyntheticSet) -> list[str]:
    return [synthetic.caption(synthetic.attributes(data.seed, i, data.textures, data.background_textures))
            for i in range(data.start, data.start + data.num)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("classifier"))
    t0 = time.perf_counter()
    model = train_classifier(TRAIN, RES, STEPS, out, width=WIDTH, threads=1)
    return model, out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def held_out():
    images, _ = synthetic_images(HELD_OUT, RES)
    return as_model_input(images), prompts_of(HELD_OUT)


def test_accurate_on_held_out_synthetic_images(trained, held_out):
    model, _, train_s = trained
    acc = caption_accuracy(model, *held_out)
    print(f"trained {STEPS} steps at {RES} px in {train_s:.1f}s; held-out accuracy {acc}")
    assert set(acc) == {*BASE_HEADS, "background_texture", "all"}
    assert acc["all"] >= 0.90, acc
    assert min(acc.values()) >= 0.90, acc
    assert not model.training


def test_noise_images_score_near_chance(trained, held_out):
    model, _, _ = trained
    _, prompts = held_out
    noise = torch.rand(len(prompts), 3, RES, RES, generator=torch.Generator().manual_seed(0)) * 2 - 1
    acc = caption_accuracy(model, noise, prompts)
    wanted = [synthetic.parse_caption(p) for p in prompts]
    for head in model.vocab:
        # Predictions that ignore the prompt score at most the most frequent label's share.
        majority = collections.Counter(w[head] for w in wanted).most_common(1)[0][1] / len(wanted)
        assert acc[head] <= majority + 0.08, (head, acc[head], majority)
    assert acc["all"] <= 0.05, acc


def test_saved_as_safetensors_with_vocabulary(trained, held_out):
    model, out, _ = trained
    assert os.path.exists(os.path.join(out, WEIGHTS))
    with open(os.path.join(out, CONFIG)) as f:
        cfg = json.load(f)
    assert cfg["resolution"] == RES and cfg["steps"] == STEPS and cfg["width"] == WIDTH
    assert cfg["vocab"] == {h: list(synthetic.LABELS[h]) for h in (*BASE_HEADS, "background_texture")}
    assert cfg["trained_on"]["synthetic"]["background_textures"] == list(ALL)
    loaded = load_classifier(out)
    images, prompts = held_out
    assert loaded.predict(images[:64]) == model.predict(images[:64])
    assert caption_accuracy(loaded, images[:128], prompts[:128]) == caption_accuracy(model, images[:128], prompts[:128])
    with pytest.raises(FileNotFoundError, match="missing caption_classifier.json"):
        load_classifier(os.path.dirname(out))


def test_bad_input_is_refused(trained, held_out):
    model, _, _ = trained
    images, prompts = held_out
    with pytest.raises(ValueError, match="as many prompts as images"):
        caption_accuracy(model, images[:3], prompts[:2])
    with pytest.raises(ValueError, match="prompt 1: caption 'a cat' does not follow"):
        caption_accuracy(model, images[:2], [prompts[0], "a cat"])
    with pytest.raises(ValueError, match=r"reads \[N, 3, 16, 16\] images \(its training resolution\), got \[2, 3, 32, 32\]"):
        caption_accuracy(model, torch.zeros(2, 3, 32, 32), prompts[:2])
    striped = "a red striped circle at the center on a white background"
    with pytest.raises(ValueError, match="prompt 1 names a stripes texture, but this classifier has no 'texture' head"):
        caption_accuracy(model, images[:2], [prompts[0], striped])


def test_trains_from_shards_with_heads_from_the_data(tmp_path):
    flat = str(tmp_path / "flat")
    shards.write_shards((synthetic.sample(0, i, RES) for i in range(48)), flat, 16, prefix="shapes")
    model = train_classifier(flat, RES, 3, str(tmp_path / "m1"), batch_size=8, threads=1)
    assert list(model.vocab) == list(BASE_HEADS)  # no textures in the data: no texture heads
    textured = str(tmp_path / "textured")
    shards.write_shards((synthetic.sample(0, i, RES, ALL) for i in range(48)), textured, 16, prefix="shapes")
    model = train_classifier(textured, RES, 3, str(tmp_path / "m2"), batch_size=8, max_images=40, threads=1)
    assert list(model.vocab) == [*BASE_HEADS, "texture"]
    with open(tmp_path / "m2" / CONFIG) as f:
        cfg = json.load(f)
    assert cfg["trained_on"] == {"shards": textured} and cfg["train_images"] == 40
    # captions outside the grammar are named, not guessed at
    odd = str(tmp_path / "odd")
    shards.write_shards([{"__key__": "x", "png": synthetic.sample(0, 0, RES)["png"], "txt": b"a photo of a cat"}],
                        odd, 16, prefix="odd")
    with pytest.raises(DataError, match="odd-000000.tar:x: caption 'a photo of a cat' does not follow"):
        train_classifier(odd, RES, 1, threads=1)
