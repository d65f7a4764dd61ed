"""The two halves of the cache job's work: decoding in DataLoader workers, encoding in the
main process (where the accelerator is) into output shards, and the fp32 rescue of half-precision overflows."""
from __future__ import annotations

import copy
import os

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline import source_info, storage
from data_pipeline.images import crop_top_left, image_and_caption, loss_mask, original_crop_box
from data_pipeline.latents import encode_sample, keys_digest, trim_text
from data_pipeline.shards import ShardWriter, iter_samples
from data_pipeline.storage import DataError
from models.autoencoder import encode_moments

from trainer.cache.manifest import ChannelStats


def _keep(item):
    return item


class ShardImages(IterableDataset):
    """Decoded images of the given input shards, in batches that never span two shards.

    Workers take whole shards (job j goes to worker j % workers), so the samples of one
    output shard keep their input order whatever the number of workers. Each shard ends
    with an item marked `last`, carrying the samples that failed to decode.

    With a `bucketer` (data_pipeline.buckets.ImageBucketer) each image is resized and cropped to
    its aspect-ratio bucket, read from its header, and a batch holds one bucket: a sample waits
    until its bucket's batch is full, and the partial batches go at the end of the shard, in
    bucket order. The output order is then a function of the shard alone, as without buckets.
    """

    def __init__(self, jobs: list[tuple[int, str]], decode_options: dict, batch_size: int,
                 endpoint_url: str | None, max_member_bytes: int, bucketer=None, mask: tuple[str, int] = ("none", 1)):
        self.jobs, self.options, self.batch_size = jobs, decode_options, batch_size
        self.endpoint_url, self.max_member_bytes, self.bucketer = endpoint_url, max_member_bytes, bucketer
        self.mask_mode, self.factor = mask  # loss masks (cache mask=) on the latent grid of this downsample factor

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for shard, url in self.jobs[worker::workers]:
            failed, pending, seq = [], {}, iter(range(1 << 62))  # bucket -> samples waiting for a full batch
            report = lambda _url, key, message: failed.append({"key": key, "error": message})  # noqa: E731
            for sample in iter_samples(url, self.endpoint_url, on_error=report, max_member_bytes=self.max_member_bytes):
                bucket = self.bucketer(sample) if self.bucketer is not None else 0
                target = self.bucketer.buckets[bucket] if self.bucketer is not None else self.options["resolution"]
                try:
                    x, caption, size = image_and_caption(sample, **{**self.options, "resolution": target})
                    info = source_info.parse(sample)  # make_shards' (or img2dataset's) .json
                    mask = None if self.mask_mode == "none" else loss_mask(
                        sample, target, size, self.mask_mode, self.factor, self.options["max_pixels"],
                        self.options["formats"])
                except DataError as e:
                    failed.append({"key": sample["__key__"], "error": str(e)})
                    continue
                batch = pending.setdefault(bucket, [])
                meta = sample_meta(size, target, info.original_size)
                alts = list(info.captions[1:]) if info.captions[:1] == (caption,) else []  # captions after the .txt's
                if alts:
                    meta["captions"] = [caption, *alts]  # the trainer picks one per sample and epoch
                batch.append((sample["__key__"], x, caption, meta, info.repeats, alts, mask))
                if len(batch) == self.batch_size:
                    yield _item(shard, next(seq), pending.pop(bucket), False, [])
            rest = [pending[b] for b in sorted(pending)]
            for batch in rest[:-1]:
                yield _item(shard, next(seq), batch, False, [])
            yield _item(shard, next(seq), rest[-1] if rest else [], True, failed)


def sample_meta(size: tuple[int, int], target, original_size: tuple[int, int] | None = None) -> dict:
    """What a cached sample records of its image (KEY.json): the original (w, h), the crop box in the
    image's pixels, the encoded (w, h), and (top, left) cut from the resized image. The original size,
    crop and target size are SDXL's micro-conditioning; `original_size`: the size before a resize the
    source did (img2dataset's), which SDXL is to be conditioned on, else the image's own."""
    target = (target, target) if isinstance(target, int) else tuple(target)
    return {"original_size": list(original_size or size),
            "crop_box": [round(v, 2) for v in original_crop_box(size, target)],
            "target_size": list(target), "crop_top_left": list(crop_top_left(size, target))}


def _item(shard: int, index: int, batch: list, last: bool, failed: list) -> dict:
    # Stacked here, in the worker: one tensor crosses to the main process per batch, not one
    # per image (each shared tensor costs a file descriptor hand-over). `index`: the batch's place in
    # its shard, so that the main process notices a batch lost on the way (#27: a worker whose batch
    # did not fit /dev/shm dropped it, and the cache job exited 0 with shards missing).
    keys, xs, captions, metas, repeats, alts, masks = zip(*batch) if batch else ((), (), (), (), (), (), ())
    return {"shard": shard, "index": index, "keys": list(keys), "x": torch.stack(xs) if xs else None,
            "captions": list(captions), "metas": list(metas), "repeats": list(repeats), "alts": list(alts),
            "masks": list(masks), "last": last, "failed": failed}


PREFETCH = 4  # batches each worker keeps ready


def shm_workers(num_workers: int, batch_bytes: int, say=print) -> int:
    """`num_workers`, or 0 where /dev/shm cannot hold the batches they keep in flight: DataLoader workers
    hand each batch over through shared memory, and one that does not fit is lost, not reported (Docker
    gives 64 MB; a batch of 64 images at 512 px is 200 MB). Decoding then runs in the main process."""
    if num_workers <= 0 or not os.path.isdir("/dev/shm"):
        return num_workers
    st = os.statvfs("/dev/shm")
    free, need = st.f_bavail * st.f_frsize, num_workers * (PREFETCH + 1) * batch_bytes
    if free >= need:
        return num_workers
    say(f"note: /dev/shm has {free / 2**20:.0f} MB free, {num_workers} loader workers need about "
        f"{need / 2**20:.0f} MB for their batches: decoding in the main process (data.num_workers=0); give the "
        "container more shared memory (docker --shm-size) to decode in workers")
    return 0


def shard_images_loader(dataset: ShardImages, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_keep,
                      prefetch_factor=PREFETCH if num_workers > 0 else None)


class LatentEncoder:
    """The frozen VAE in the job's precision, with an fp32 copy made on first need.

    fp16 VAEs overflow on some images (the SD/SDXL fp16 NaN problem, diffusers #7188): a
    sample whose moments are not finite is encoded again in fp32, and if they are still not
    finite it is reported, never written.
    """

    def __init__(self, vae, dtype: torch.dtype):
        self.vae, self.dtype, self._fp32 = vae, dtype, None
        self.rescued = 0

    def _moments(self, vae, x: torch.Tensor):
        # AutoencoderKL: posterior mean/std; VQModel: pre-quantisation latent, std 0.
        mean, std = encode_moments(vae, x.to(vae.device, next(vae.parameters()).dtype))
        return mean.float(), std.float()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, ok) for a batch of images; `ok[i]` is False when sample i stayed non-finite."""
        mean, std = self._moments(self.vae, x)
        ok = torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1)
        if not ok.all() and self.dtype != torch.float32:
            if self._fp32 is None:
                self._fp32 = copy.deepcopy(self.vae).float()
            bad = (~ok).nonzero().flatten().to(x.device)
            m32, s32 = self._moments(self._fp32, x[bad.cpu()])
            mean[bad], std[bad] = m32.to(mean.dtype), s32.to(std.dtype)
            self.rescued += len(bad)
            ok = torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1)
        return mean.cpu(), std.cpu(), ok.cpu()


class ShardOut:
    """One output shard being written: batches are encoded and written as they arrive, so
    the encoder starts on a shard's first batch instead of waiting for its last."""

    def __init__(self, cfg, out: str, source: str, settings: dict):
        self.cfg, self.out, self.source, self.cfg_settings = cfg, out, source, settings
        self.writer = ShardWriter(out, cfg.out_endpoint_url).__enter__()
        self.count, self.failed, self.stats, self.keys, self.buckets = 0, [], None, [], {}
        self.repeats = {}  # repeat count (kohya's folders, via make_shards' .json) -> samples with it
        self.next_index = 0

    def add(self, item: dict, encoder: LatentEncoder, text_encoder) -> None:
        if item["index"] != self.next_index:  # a batch lost between a worker and here: never a short shard
            raise storage.DataError(f"batch {self.next_index} of {self.source} never arrived from its loader worker "
                                    f"(batch {item['index']} did); {LOST}")
        self.next_index += 1
        self.failed += item["failed"]
        if item["x"] is None:
            return
        x, keys, captions = item["x"], item["keys"], item["captions"]
        mean, std, ok = encoder(x)
        moments = {"mean": mean, "std": std}
        if self.cfg.flip:
            mean_f, std_f, ok_f = encoder(torch.flip(x, dims=[3]))
            moments.update(mean_flip=mean_f, std_flip=std_f)
            ok &= ok_f
        # fp16 storage must hold them too: 1e5 is finite in fp32 and inf in fp16.
        ok &= torch.stack([torch.isfinite(t.half()).flatten(1).all(1) for t in moments.values()]).all(0)
        text = self._text(captions, text_encoder)
        # A sample's further captions (make_shards' .json), cached beside the first as KEY_alt[n-1, ...]:
        # the trainer picks one caption per sample and epoch.
        alts = item.get("alts") or [[] for _ in keys]
        flat = [c for a in alts for c in a]
        alt_text = self._text(flat, text_encoder) if flat else {}
        if self.stats is None:
            self.stats = ChannelStats(mean.shape[1])
        for i, key in enumerate(keys):
            if not ok[i]:
                self.failed.append({"key": key, "error": "latents not finite, also when encoded in fp32"})
                continue
            self.stats.add(mean[i:i + 1], std[i:i + 1])
            tensors = {k: v[i] for k, v in {**moments, **text}.items()}
            if item["masks"][i] is not None:
                tensors["mask"] = item["masks"][i]
            if alts[i]:
                start = sum(len(a) for a in alts[:i])
                tensors.update({f"{k}_alt": v[start:start + len(alts[i])] for k, v in alt_text.items()})
            tensors = trim_text(tensors)  # SD3/Flux: each caption's own T5 tokens (#30); no-op for CLIP
            self.writer.write(encode_sample(key, tensors, captions[i], item["metas"][i]))
            shape = "x".join(map(str, item["metas"][i]["target_size"]))
            self.buckets[shape] = self.buckets.get(shape, 0) + 1
            self.repeats[item["repeats"][i]] = self.repeats.get(item["repeats"][i], 0) + 1
            self.keys.append(key)
            self.count += 1

    def _text(self, captions: list[str], text_encoder) -> dict:
        if self.cfg.text == "tokens":  # 4 bytes a token instead of 2 x width: the trainer runs the encoder
            return {"tokens": text_encoder.tokenize(captions).int()}
        return {k: v.float().cpu() for k, v in text_encoder.embed(captions).items()}  # text_emb, SDXL's pooled

    def close(self) -> dict:
        """Make the shard visible; returns its sidecar entry."""
        self.writer.__exit__(None, None, None)
        for f in self.failed:
            print(f"quarantined {self.source}:{f['key']}: {f['error']}")
        # The loader repeats shards, not samples: a shard holds one repeat count (make_shards writes it so).
        repeats = max(self.repeats, key=lambda r: (self.repeats[r], r)) if self.repeats else 1
        if len(self.repeats) > 1:
            print(f"note: {self.source} mixes samples of repeat counts {sorted(self.repeats)}: all are repeated "
                  f"{repeats} times (write each count to its own shards: launch/make_shards.py does)")
        return {"shard": os.path.basename(self.out), "count": self.count, "source": self.source,
                "keys_sha256": keys_digest(self.keys), "settings": self.cfg_settings, "quarantined": self.failed,
                "buckets": self.buckets, **({"repeats": repeats} if repeats != 1 else {}),
                "stats": (self.stats or ChannelStats(0)).to_json()}


LOST = ("workers hand batches over through /dev/shm, which may be too small: rerun with data.num_workers=0 or "
         "more shared memory (docker --shm-size); finished shards are kept")
