"""#28: the dataset layouts users have, read by launch/make_shards.py (data_pipeline/layouts.py,
data_pipeline/ingest.py), and what the cache job keeps of them."""
from __future__ import annotations

import io
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
    by_shard = [[(x["txt"].decode(), parse(x).repeats) for x in iter_samples(u)] for u in expand_shards(str(tmp_path / "out"))]
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
        assert [(x["png"], x["txt"]) for x in got] == [(png((9, 9, 9)), b"first"), (png((8, 8, 8), (16, 16)), b"second")]
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


def test_a_huge_caption_file_is_not_read_whole(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.png").write_bytes(png())
    (src / "a.txt").write_bytes(b"x" * (layouts.MAX_CAPTION_BYTES + 1))
    with pytest.raises(DataError, match="larger than"):
        summary_of(src, tmp_path / "out")


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
    """(key, epoch, weight) of every slot every rank trained, from run_dir/samples/ (data.log_samples)."""
    out = []
    for name in sorted(os.listdir(run_dir / "samples")):
        for line in (run_dir / "samples" / name).read_text().splitlines():
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
        seen = _trained(run_dir) if (run_dir / "samples").exists() else []
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

