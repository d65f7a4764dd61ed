"""#28: the dataset layouts users have, read by launch/make_shards.py (data_pipeline/layouts.py,
data_pipeline/ingest.py), and what the cache job keeps of them."""
from __future__ import annotations

import io
import itertools
import json
import os
import tarfile

import pytest
from PIL import Image

from conftest import PY, run_cmd
from data_pipeline import layouts
from data_pipeline.ingest import ingest, samples_per_shard
from data_pipeline.shards import ShardWriter, iter_samples
from data_pipeline.source_info import parse
from data_pipeline.storage import DataError, expand_shards


def png(color=(200, 30, 30), size=(12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def written(out) -> list[dict]:
    return [s for u in expand_shards(str(out)) for s in iter_samples(u)]


def summary_of(src, out, **kw):
    return ingest(str(src), str(out), **kw)


# --- each layout ------------------------------------------------------------------------------------

def test_folder_with_txt_and_caption_files_and_a_summary_of_what_was_skipped(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    (src / "a.png").write_bytes(png())
    (src / "a.txt").write_text("a red box\n")
    (src / "sub" / "b.jpg").write_bytes(png((1, 2, 3)))  # PNG bytes behind a .jpg name: copied unchanged
    (src / "sub" / "b.caption").write_text("kohya's caption extension")
    (src / "c.png").write_bytes(png())  # no caption
    (src / "d.png").write_bytes(b"not an image")
    (src / "d.txt").write_text("x")
    (src / "e.webp").write_bytes(png())
    (src / "e.txt").write_text("   ")  # an empty caption
    assert layouts.detect(str(src)) == "folder"
    s = summary_of(src, tmp_path / "out")
    got = written(tmp_path / "out")
    assert [(x["txt"], json.loads(x["json"])["name"]) for x in got] == [(b"a red box", "a.png"),
                                                                        (b"kohya's caption extension", "sub/b.jpg")]
    assert got[0]["png"] == png() and got[1]["jpg"] == png((1, 2, 3))
    assert s.written == 2 and sorted((p.name, p.reason) for p in s.skipped) == [
        ("c.png", "no caption file (.txt or .caption)"), ("d.png", "not a readable JPEG/PNG/WEBP image"),
        ("e.webp", "empty caption")]
    lines = "\n".join(s.lines())
    assert "read 5 items as folder: wrote 2 samples in 1 shards, skipped 3" in lines and "c.png" in lines
    listed = [json.loads(x) for x in (tmp_path / "out" / "data-skipped.jsonl").read_text().splitlines()]
    assert sorted(p["name"] for p in listed) == ["c.png", "d.png", "e.webp"]


def test_kohya_folders_give_repeats_class_captions_and_one_repeat_count_per_shard(tmp_path):
    src = tmp_path / "train"
    (src / "10_sks dog").mkdir(parents=True)
    (src / "1_dog").mkdir()
    (src / "notes").mkdir()
    for i in range(3):
        (src / "10_sks dog" / f"{i}.png").write_bytes(png((i, 0, 0)))
    (src / "10_sks dog" / "1.txt").write_text("sks dog on the grass")
    (src / "1_dog" / "x.png").write_bytes(png())
    (src / "notes" / "y.png").write_bytes(png())
    assert layouts.detect(str(src)) == "kohya"
    s = summary_of(src, tmp_path / "out", per_shard=2)
    by_shard = [[(x["txt"].decode(), parse(x).repeats) for x in iter_samples(u)]
                for u in expand_shards(str(tmp_path / "out"))]
    assert by_shard == [[("sks dog", 10), ("sks dog on the grass", 10)], [("sks dog", 10)], [("dog", 1)]]
    assert s.repeats == {10: 3, 1: 1}
    assert [(p.name, p.reason) for p in s.skipped] == [("notes/y.png", "its folder 'notes' is not named N_class "
                                                                       "(e.g. 10_sks dog)")]
    assert "repeats per epoch: 1 samples x1, 3 samples x10" in s.lines()


def test_imagefolder_metadata_jsonl_and_csv_with_several_captions_and_hostile_rows(tmp_path):
    src = tmp_path / "imf"
    (src / "train").mkdir(parents=True)
    for n in ("p", "q", "r", "s"):
        (src / "train" / f"{n}.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    os.symlink(tmp_path / "secret.png", src / "train" / "link.png")
    rows = [{"file_name": "p.png", "text": "pp"}, {"file_name": "../../secret.png", "text": "out"},
            {"file_name": "link.png", "text": "out by a link"}, {"file_name": "q.png", "text": ["q one", "q two"]},
            {"file_name": "missing.png", "text": "gone"}, {"file_name": "r.png", "text": 5}]
    (src / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
    assert layouts.detect(str(src)) == "imagefolder"
    s = summary_of(src, tmp_path / "out")
    got = written(tmp_path / "out")
    assert [(x["txt"], parse(x).captions) for x in got] == [(b"pp", ()), (b"q one", ("q one", "q two"))]
    reasons = {p.name: p.reason for p in s.skipped}
    assert "points outside" in reasons["train/metadata.jsonl row 2"]
    assert "points outside" in reasons["train/metadata.jsonl row 3"]  # a link out is outside too
    assert "not an image file" in reasons["train/metadata.jsonl row 5"]
    assert "not a string" in reasons["train/metadata.jsonl row 6"]
    assert reasons["train/metadata.jsonl row 7"] == "not an object"
    assert reasons["train/s.png"] == "no row in any metadata file"
    csv_src = tmp_path / "csv"
    csv_src.mkdir()
    (csv_src / "a.png").write_bytes(png())
    (csv_src / "metadata.csv").write_text('file_name,caption\na.png,"a caption, with a comma"\n')
    summary_of(csv_src, tmp_path / "out_csv")
    assert written(tmp_path / "out_csv")[0]["txt"] == b"a caption, with a comma"


def test_hugging_face_dataset_on_disk_and_as_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [{"bytes": png((9, 9, 9)), "path": None},
                                               {"bytes": png((8, 8, 8), (16, 16)), "path": None}],
                                     "text": ["first", "second"]}).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    for name in ("disk", "pq"):
        assert layouts.detect(str(tmp_path / name)) == "hf"
        summary_of(tmp_path / name, tmp_path / f"out_{name}")
        got = written(tmp_path / f"out_{name}")
        assert [(x["png"], x["txt"]) for x in got] == [(png((9, 9, 9)), b"first"),
                                                       (png((8, 8, 8), (16, 16)), b"second")]
    with pytest.raises(DataError, match="has no caption column .*name it with --caption-column"):
        summary_of(tmp_path / "disk", tmp_path / "out_x", caption_column="prompt")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "state.json").write_text("{}")
    (tmp_path / "junk" / "dataset_info.json").write_text("[")
    with pytest.raises(DataError, match=r"is not a readable Hugging Face dataset"):
        summary_of(tmp_path / "junk", tmp_path / "out_junk")


def test_img2dataset_shards_keep_the_original_size_for_sdxl(tmp_path):
    src = tmp_path / "i2d"
    src.mkdir()
    with ShardWriter(str(src / "00000.tar")) as w:
        w.write({"__key__": "000000000", "jpg": png(), "txt": b"from the web",
                 "json": json.dumps({"url": "http://x", "original_width": 4000, "original_height": 3000,
                                     "caption": "from the web"}).encode()})
        w.write({"__key__": "000000001", "jpg": png(), "json": json.dumps({"caption": "only in json",
                                                                             "original_width": None}).encode()})
        w.write({"__key__": "000000002", "jpg": png()})
    assert layouts.detect(str(src)) == "webdataset"
    s = summary_of(src, tmp_path / "out")
    got = written(tmp_path / "out")
    assert [(x["txt"], parse(x).original_size) for x in got] == [(b"from the web", (4000, 3000)),
                                                                   (b"only in json", None)]
    assert [p.reason for p in s.skipped] == ["no caption (.txt, or caption in .json)"]
    # The cache job reads the same contract straight from img2dataset's own .json too.
    assert parse({"json": b'{"original_width": 640, "original_height": 480, "status": "success"}'}).original_size \
        == (640, 480)
    for bad in (b'{"repeats": 0}', b'{"repeats": true}', b'{"original_size": [1, -2]}', b'{"captions": "x"}', b"{"):
        with pytest.raises(DataError, match="sample .*: "):
            parse({"__key__": "k", "json": bad})


# --- sizes, refusals ------------------------------------------------------------------------------------

def test_per_shard_is_picked_from_the_dataset_size():
    assert samples_per_shard(40, 2e6) == 100  # one shard for 40 photos
    assert samples_per_shard(100_000, 1e5) == 1000
    assert samples_per_shard(20_000, 5e6) == 107  # ~512 MB shards of 5 MB photos
    assert samples_per_shard(None, None) == 1000


def test_nothing_usable_is_an_error_naming_why_and_the_output_is_untouched(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    out = tmp_path / "out"
    proc = run_cmd([PY, "launch/make_shards.py", "--images", str(src), "--out", str(out)], check=False, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: no usable images found in {src} (read as folder): 1 no "
                                                    "caption file (.txt or .caption)")
    with pytest.raises(DataError, match="does not exist"):
        layouts.detect(str(tmp_path / "nowhere"))


def test_a_huge_caption_or_image_file_is_skipped_unread(tmp_path, monkeypatch):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    (src / "a.txt").write_bytes(b"x" * (layouts.MAX_CAPTION_BYTES + 1))
    (src / "b.png").write_bytes(png() + b"\0" * 2000)
    (src / "b.txt").write_text("fine caption, too large an image")
    (src / "c.png").write_bytes(png())
    (src / "c.txt").write_text("fine")
    monkeypatch.setattr(layouts, "MAX_IMAGE_BYTES", 2000)
    s = summary_of(src, tmp_path / "out")
    assert s.written == 1 and sorted((p.name, p.reason) for p in s.skipped) == [
        ("a.png", f"its a.txt is larger than {layouts.MAX_CAPTION_BYTES} bytes"),
        ("b.png", "larger than 0 MB (data.max_member_mb)")]


def test_make_shards_command_line_detects_the_layout(tmp_path):
    src = tmp_path / "train" / "5_toy"
    src.mkdir(parents=True)
    (src / "a.png").write_bytes(png())
    out = tmp_path / "out"
    proc = run_cmd([PY, "launch/make_shards.py", "--images", str(tmp_path / "train"), "--out", str(out)], timeout=120)
    assert "read 1 items as kohya: wrote 1 samples in 1 shards" in proc.stdout
    assert "repeats per epoch: 1 samples x5" in proc.stdout
    with tarfile.open(out / "data-000000.tar") as t:
        assert sorted(t.getnames()) == ["000000000.json", "000000000.png", "000000000.txt"]


# --- folder to training: a 40-image kohya set with buckets, repeats and class images -------------------

# Images of five aspect ratios: with data.resolution=32 and data.bucket_step=8 they fall into the five
# buckets 24x48, 24x40, 32x32, 40x24 and 48x24 (uneven numbers of each).
SHAPES = [(48, 96), (48, 80), (64, 64), (80, 48), (96, 48)]
INSTANCE = {"3_sks toy": 10, "1_toy": 30}  # folder -> images: 10 x 3 repeats + 30 x 1 = 60 a epoch
CLASS_IMAGES, CLASS_REPEATS, PRIOR = 8, 2, 0.5


def _kohya_set(root):
    i = 0
    for folder, n in INSTANCE.items():
        (root / folder).mkdir(parents=True)
        for _ in range(n):
            (root / folder / f"{i:02d}.png").write_bytes(png((i * 6, 255 - i * 6, 90), SHAPES[(i * i) % 5]))
            i += 1


def _cache(shards, out):
    run_cmd([PY, "launch/cache_latents.py", f"data.urls={shards}", "data.resolution=32", "data.buckets=true",
             "data.bucket_step=8", f"out_url={out}", "vae=preset:tiny", "text_encoder=tiny", "batch_size=8"])


def _trained(run_dir) -> list[tuple[str, int, float]]:
    """(key, epoch, weight) of every slot every rank trained, from run_dir/data_log/ (data.log_samples)."""
    out = []
    for name in sorted(os.listdir(run_dir / "data_log")):
        for line in (run_dir / "data_log" / name).read_text().splitlines():
            row = json.loads(line)
            out += list(zip(row["keys"], row["epochs"], row["weights"]))
    return out


def test_folder_to_training_every_image_once_per_epoch_through_a_kill_and_an_elastic_resume(tmp_path):
    import collections
    import signal
    import subprocess
    import time

    from conftest import ROOT, ranks_of

    _kohya_set(tmp_path / "train")
    ingest(str(tmp_path / "train"), str(tmp_path / "shards"))
    (tmp_path / "class").mkdir()
    for i in range(CLASS_IMAGES):
        (tmp_path / "class" / f"c{i}.png").write_bytes(png((10, 10, i * 30), (64, 64)))
        (tmp_path / "class" / f"c{i}.txt").write_text("a toy")
    ingest(str(tmp_path / "class"), str(tmp_path / "class_shards"))
    _cache(tmp_path / "shards", tmp_path / "latents")
    _cache(tmp_path / "class_shards", tmp_path / "class_latents")
    names = {s["__key__"]: json.loads(s["json"])["name"] for s in written(tmp_path / "shards")}

    run_dir = tmp_path / "run"
    args = ["launch/train_unet.py", f"run_dir={run_dir}", f"data.urls={tmp_path / 'latents'}",
            f"data.class_urls={tmp_path / 'class_latents'}", f"data.class_repeats={CLASS_REPEATS}",
            f"data.prior_loss_weight={PRIOR}", "data.num_workers=2", "data.log_samples=true", "model=tiny",
            "batch_per_rank=2", "zero_stage=0", "total_samples=320", "warmup_samples=8",
            "checkpoint_every_samples=24", "log_every_samples=24", "wandb=disabled"]
    # 1. Two ranks x two workers, killed (SIGKILL, no checkpoint) after the first checkpoint, mid-epoch.
    proc = subprocess.Popen([*ranks_of(2), *args], cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        seen = _trained(run_dir) if (run_dir / "data_log").exists() else []
        if len(seen) >= 40 and checkpoint_exists(run_dir):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # 2. The same command resumes from the checkpoint (the steps after it are trained again, their
    # lines in the sample log replaced); it stops mid-epoch 1 with a checkpoint.
    run_cmd([*ranks_of(2), *args, "stop_after_samples=96"], timeout=600)
    # 3. An elastic resume on one rank trains to the end.
    out = run_cmd([*ranks_of(1), *args, "elastic_resume=true"], timeout=600).stdout
    assert "samples per epoch with 8 class images x2 weighted 0.5" in out

    want = collections.Counter()
    for key, name in names.items():
        want[("instance", name)] = 3 if name.startswith("3_") else 1
    for i in range(CLASS_IMAGES):
        want[("class", f"c{i}")] = CLASS_REPEATS
    slots = _trained(run_dir)
    assert sum(1 for _ in slots) >= 320
    for epoch in (0, 1):  # epoch 2 came after both: they are complete
        got = collections.Counter()
        for key, e, weight in slots:
            if e != epoch or weight == 0:
                continue
            url, k = key.rsplit(":", 1)
            if "class_latents" in url:
                assert weight == PRIOR
                got[("class", f"c{int(k)}")] += 1
            else:
                assert weight == 1.0
                got[("instance", names[k])] += 1
        assert got == want, f"epoch {epoch}"
    assert max(e for _, e, _ in slots) >= 2


def checkpoint_exists(run_dir) -> bool:
    from trainer.core import checkpoint

    return checkpoint.latest(str(run_dir)) is not None



# --- captions: several per image, shuffled tags ------------------------------------------------------------

def test_shuffle_tags_keeps_the_first_tags_and_is_a_function_of_the_generator():
    import numpy as np

    from data_pipeline.captions import shuffle_tags

    caption = "sks dog, on grass, sunny, photo, 4k"
    outs = {shuffle_tags(caption, 1, np.random.default_rng(s)) for s in range(20)}
    assert len(outs) > 5 and all(o.startswith("sks dog, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted(caption.split(", ")) for o in outs)
    assert shuffle_tags(caption, 1, np.random.default_rng(3)) == shuffle_tags(caption, 1, np.random.default_rng(3))
    assert shuffle_tags(" a,, b ,", 5, np.random.default_rng(0)) == "a, b"


@pytest.fixture(scope="module")
def two_caption_caches(tmp_path_factory):
    """An imagefolder set whose images have two captions each, cached with text=tokens and text=embeddings."""
    root = tmp_path_factory.mktemp("captions")
    (root / "imf").mkdir()
    rows = []
    for i in range(4):
        (root / "imf" / f"{i}.png").write_bytes(png((i * 50, 0, 0), (16, 16)))
        rows.append({"file_name": f"{i}.png", "text": [f"red, square, number {i}", f"a drawing, of {i}, bold"]})
    (root / "imf" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(str(root / "imf"), str(root / "shards"))
    for text in ("tokens", "embeddings"):
        run_cmd([PY, "launch/cache_latents.py", f"data.urls={root / 'shards'}", "data.resolution=16",
                 f"out_url={root / text}", "vae=preset:tiny", "text_encoder=tiny", "batch_size=4", f"text={text}"])
    return root, rows


def _decoded(cache, picker, epoch):
    from data_pipeline.latents import CachedSampleDecoder

    decode = CachedSampleDecoder(False, 4, False, captions=picker)
    return {s["__key__"]: decode({**s, "__epoch__": epoch}) for u in expand_shards(str(cache)) for s in iter_samples(u)}


def test_several_captions_are_cached_and_one_is_picked_per_sample_and_epoch(two_caption_caches):
    import torch

    from data_pipeline.captions import CaptionPicker
    from models.text_encoder import load_text_encoder

    root, rows = two_caption_caches
    enc = load_text_encoder("tiny")
    for text in ("tokens", "embeddings"):
        seen = set()
        for epoch in range(16):
            got = _decoded(root / text, CaptionPicker(seed=1), epoch)
            assert not any(k.endswith("_alt") for t in got.values() for k in t)
            for key, tensors in got.items():
                captions = rows[int(key)]["text"]
                want = [enc.tokenize([c])[0].int() for c in captions] if text == "tokens" else \
                    [enc.embed([c])["text_emb"][0].half() for c in captions]
                have = tensors["tokens"] if text == "tokens" else tensors["text_emb"]
                # Token ids exactly; embeddings to fp16 rounding (the cache encodes captions in batches, whose
                # matrix products may round differently from one caption's)
                which = [i for i, w in enumerate(want) if torch.equal(have, w) or (
                    text != "tokens" and torch.allclose(have.float(), w.float(), atol=2e-3, rtol=2e-3))]
                assert len(which) == 1, (text, key)
                seen.add((key, which[0]))
        assert len(seen) == 8, text  # every caption of every image was picked in some epoch
        assert _decoded(root / text, CaptionPicker(seed=1), 2)["000000001"]["tokens" if text == "tokens" else
                                                                          "text_emb"].shape[0] > 0


def test_caption_shuffle_tokenizes_the_shuffled_tags_and_needs_a_token_cache(two_caption_caches):
    import torch

    from data_pipeline.captions import CaptionPicker
    from models.text_encoder import load_text_encoder
    from trainer.cache.manifest import Manifest
    from trainer.core.errors import ConfigError
    from trainer.unet.data import caption_picker
    from trainer.unet.job import UNetJob

    root, rows = two_caption_caches
    enc = load_text_encoder("tiny")
    orders = set()
    for epoch in range(8):
        for key, tensors in _decoded(root / "tokens", CaptionPicker(1, True, 1, enc.tokenize), epoch).items():
            candidates = []
            for caption in rows[int(key)]["text"]:
                first, *rest = caption.split(", ")
                candidates += [", ".join([first, *p]) for p in itertools.permutations(rest)]
            match = [c for c in candidates if torch.equal(enc.tokenize([c])[0].int(), tensors["tokens"])]
            assert match, key
            orders.add(match[0])
    assert len(orders) > 8  # both captions, both tag orders
    cfg = UNetJob(caption_shuffle=True, keep_tokens=1)
    cfg.data.urls = str(root / "embeddings")
    with pytest.raises(ConfigError, match="caption_shuffle=true needs a cache made with text=tokens"):
        caption_picker(cfg, Manifest.read(str(root / "embeddings")), None)
    with pytest.raises(ConfigError, match="keep_tokens=2 needs caption_shuffle=true"):
        UNetJob(keep_tokens=2, data=UNetJob().data.__class__(urls="x")).validate()


# --- masked loss ---------------------------------------------------------------------------------------------

def test_a_masked_region_gets_zero_loss_gradient():
    import torch
    from diffusers import DDPMScheduler

    from models.diffusion import training_loss

    class Fixed(torch.nn.Module):
        def __init__(self, pred):
            super().__init__()
            self.pred = pred

        def forward(self, zt, t, context):
            return type("Out", (), {"sample": self.pred})()

    pred = torch.zeros(2, 4, 8, 8, requires_grad=True)
    mask = torch.ones(2, 8, 8)
    mask[:, :, :4] = 0  # the left half of each latent does not count
    loss = training_loss(Fixed(pred), torch.randn(2, 4, 8, 8), torch.zeros(2, 3, 8), DDPMScheduler(),
                         torch.Generator().manual_seed(0), loss_mask=mask)
    loss.backward()
    assert float(pred.grad[..., :4].abs().max()) == 0
    assert float(pred.grad[..., 4:].abs().min()) > 0


def test_masks_from_a_mask_file_or_the_alpha_channel_are_cached_on_the_latent_grid(tmp_path):
    import torch
    from safetensors.torch import load as st_load

    from trainer.cache.manifest import Manifest

    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.png").write_bytes(png((200, 0, 0), (32, 32)))
    (src / "a.txt").write_text("masked by a file")
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (16, 0, 32, 32))  # right half trains
    m.save(src / "a.mask.png")
    rgba = Image.new("RGBA", (32, 32), (0, 200, 0, 0))
    rgba.paste((0, 200, 0, 255), (0, 0, 32, 16))  # top half opaque
    rgba.save(src / "b.png")
    (src / "b.txt").write_text("masked by its alpha")
    (src / "c.png").write_bytes(png((0, 0, 200), (32, 32)))
    (src / "c.txt").write_text("no mask")
    s = ingest(str(src), str(tmp_path / "shards"))
    assert s.written == 3  # the mask file is no image of its own
    run_cmd([PY, "launch/cache_latents.py", f"data.urls={tmp_path / 'shards'}", "data.resolution=32",
             f"out_url={tmp_path / 'latents'}", "vae=preset:tiny", "text_encoder=tiny", "batch_size=4", "mask=auto"])
    assert Manifest.read(str(tmp_path / "latents")).mask == "auto"
    masks = {bytes(x["txt"]).decode(): st_load(x["safetensors"])["mask"].float()
             for x in written(tmp_path / "latents")}
    assert masks["masked by a file"].shape == (8, 8)
    assert torch.equal(masks["masked by a file"][:, :4], torch.zeros(8, 4))
    assert torch.equal(masks["masked by a file"][:, 4:], torch.ones(8, 4))
    assert torch.equal(masks["masked by its alpha"][:4], torch.ones(4, 8))
    assert torch.equal(masks["masked by its alpha"][4:], torch.zeros(4, 8))
    assert torch.equal(masks["no mask"], torch.ones(8, 8))


def _each_layout(root) -> dict[str, str]:
    """Eight images in each layout users arrive with; returns layout -> its folder."""
    datasets = pytest.importorskip("datasets")
    colours = [(i * 30, 200 - i * 20, 90) for i in range(8)]
    sizes = [(16, 16), (24, 16), (16, 24), (20, 16)] * 2
    (root / "folder").mkdir()
    (root / "kohya" / "2_toy").mkdir(parents=True)
    (root / "imagefolder").mkdir()
    (root / "webdataset").mkdir()
    rows, hf = [], {"image": [], "text": []}
    with ShardWriter(str(root / "webdataset" / "00000.tar")) as w:
        for i, (c, size) in enumerate(zip(colours, sizes)):
            data = png(c, size)
            (root / "folder" / f"{i}.png").write_bytes(data)
            (root / "folder" / f"{i}.txt").write_text(f"folder {i}")
            (root / "kohya" / "2_toy" / f"{i}.png").write_bytes(data)
            (root / "imagefolder" / f"{i}.png").write_bytes(data)
            rows.append(json.dumps({"file_name": f"{i}.png", "text": f"imagefolder {i}"}) + "\n")
            hf["image"].append({"bytes": data, "path": None})
            hf["text"].append(f"hf {i}")
            w.write({"__key__": f"{i:09d}", "jpg": data, "txt": f"web {i}".encode(),
                     "json": json.dumps({"original_width": 400, "original_height": 300}).encode()})
    (root / "imagefolder" / "metadata.jsonl").write_text("".join(rows))
    datasets.Dataset.from_dict(hf).cast_column("image", datasets.Image()).save_to_disk(str(root / "hf"))
    return {name: str(root / name) for name in layouts.LAYOUTS}


def test_every_layout_to_a_cache_feeds_two_ranks_by_two_workers_every_image_once_per_epoch(tmp_path):
    """#28: each layout -> shards -> one cache -> the UNet job's loader on 2 ranks x 2 workers: every image
    once per epoch (kohya's twice: 2 repeats), the .json's original size in the cache, from 8 images a layout."""
    import collections

    from data_pipeline.loader import ShardBatches, make_loader
    from data_pipeline.latents import read_cached_shard
    from trainer.cache.manifest import Manifest
    from trainer.core.data import LatentData
    from trainer.unet.data import training_data

    sets = _each_layout(tmp_path)
    outs = []
    for name, folder in sets.items():
        s = ingest(folder, str(tmp_path / f"shards_{name}"), prefix=name)
        assert (s.layout, s.written, s.skipped) == (name, 8, [])
        outs.append(str(tmp_path / f"shards_{name}"))
    run_cmd([PY, "launch/cache_latents.py", f"data.urls={','.join(outs)}", "data.resolution=16", "data.buckets=true",
             "data.bucket_step=8", f"out_url={tmp_path / 'latents'}", "vae=preset:tiny", "text_encoder=tiny",
             "batch_size=8"])
    manifest = Manifest.read(str(tmp_path / "latents"))
    assert {s.shard: s.repeats for s in manifest.shards}["kohya-000000.tar"] == 2
    web = [x for x in iter_samples(str(tmp_path / "latents" / "webdataset-000000.tar"))]
    assert all(json.loads(x["json"])["original_size"] == [400, 300] for x in web)
    td = training_data(LatentData(urls=str(tmp_path / "latents")), manifest, False, False)
    ranks = [ShardBatches(td.urls, td.decode, 3, seed=4, rank=r, world_size=2, num_workers=2, counts=td.counts,
                          repeats=td.repeats, weights=td.weights, bucketer=td.bucketer, checksums=td.checksums,
                          read_shard=read_cached_shard, shuffle_buffer=4) for r in range(2)]
    per_epoch = ranks[0].batches_per_epoch(0)
    want = collections.Counter({f"{n}:{i:09d}": 2 if n == "kohya" else 1 for n in sets for i in range(8)})
    got = {0: collections.Counter(), 1: collections.Counter()}
    for ds in ranks:
        for b in itertools.islice(make_loader(ds), 2 * per_epoch):
            for key, w in zip(b["keys"], b["loss_weight"].tolist()):
                if w > 0:
                    shard, k = os.path.basename(key.rsplit(":", 1)[0]), key.rsplit(":", 1)[1]
                    got[int(b["epoch"])][f"{shard.split('-')[0]}:{k}"] += 1
    assert got[0] == want and got[1] == want
