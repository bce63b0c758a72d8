"""Sharded training data: WebDataset-style tar shards, streamed by DataLoader workers.

Why tar shards (WebDataset's layout) rather than parquet: an image and its caption are one file
each inside a plain tar, so a shard is written append-only and read front to back, any tool
(`tar`, `webdataset`) opens it, and no new dependency is needed (Python's `tarfile`). Parquet would
bring pyarrow and store images as opaque blobs in row groups anyway.

Layout of a shard folder (made by `python -m lidit convert shards`):
- `shard-000000.tar`: per item `<key>.txt` (caption) and either `<key>.png` (RGB pixels, already
  cover-cropped to the item's bucket) or `<key>.latent` (safetensors bytes: the VAE's latent mean
  and std, float16), so training only decodes.
- `shard-000000.json`: the shard's item list: key, bucket, caption, and each member's byte offset
  and size in the tar, so a reader seeks straight to what it needs. Only the shards a reader is on
  are in memory, never the whole dataset's list.
- `index.json`: format, buckets, kind (pixels or latents), latent scale/shift, the shard names and
  item counts.
- `features/<group>/shard-000000.safetensors` (written by the trainer, `text_features: offline`):
  every item's frozen-LLM states, memory-mapped and read per batch; `prefix.safetensors` holds the
  template prefix and the empty caption.

Order: reader `v` of `V` (every rank runs `V = max(1, workers)` readers, one per DataLoader worker)
takes shards `v, v + V, ...` of the epoch's shard permutation, visits each shard's items in a
permuted order and emits a micro-batch whenever one bucket has gathered enough items (what is left
at the end of an epoch is dropped; the next epoch reshuffles). The plan depends only on the seed and
the item lists, so a stream's whole state is the number of batches it has handed out: a resumed
stream re-plans up to that point from the `.json` lists without reading an image.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ..vae import load_vae
from .features import Entry, ShardFeatures
from .streams import (
    BUCKET_RATIOS,
    make_buckets,
    nearest_bucket,
    resize_cover_crop,
    scan_folder,
    to_model_pixels,
)

FORMAT = "lidit-shards-v1"


@dataclass(frozen=True)
class Item:
    key: str
    bucket: int
    caption: str
    members: dict[str, tuple[int, int]]  # extension -> (offset, size) in the tar


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
class _ShardWriter:
    """Appends items to numbered tar shards, `size` items each, with their `.json` item lists."""

    def __init__(self, out: Path, size: int) -> None:
        self.out, self.size = out, size
        self.shards: list[dict] = []
        self.tar: tarfile.TarFile | None = None
        self.items: list[list] = []

    def _close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        name = f"shard-{len(self.shards):06d}"
        (self.out / f"{name}.json").write_text(json.dumps({"format": FORMAT, "items": self.items}))
        os.replace(self.out / f".{name}.tar.tmp", self.out / f"{name}.tar")
        self.shards.append({"name": name, "items": len(self.items)})
        self.tar, self.items = None, []

    def add(self, key: str, bucket: int, caption: str, blobs: dict[str, bytes]) -> None:
        if self.tar is None:
            self.tar = tarfile.open(self.out / f".shard-{len(self.shards):06d}.tar.tmp", "w", format=tarfile.USTAR_FORMAT)
        members = {}
        for ext, data in {"txt": caption.encode(), **blobs}.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            header = len(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
            members[ext] = [self.tar.offset + header, len(data)]
            self.tar.addfile(info, io.BytesIO(data))
        self.items.append([key, bucket, caption, members])
        if len(self.items) >= self.size:
            self._close()

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)  # fast to write, lossless
    return buf.getvalue()


def convert_folder(src: str | os.PathLike, out: str | os.PathLike, resolution: int, step: int,
                   buckets: Sequence[Sequence[int]] | None = None, shard_size: int = 1000, vae: Any = None,
                   vae_device: torch.device | str = "cpu", vae_dtype: torch.dtype = torch.float32,
                   vae_batch: int = 8) -> dict:
    """An image folder with same-named `.txt` captions -> shards; with `vae` (a diffusers AutoencoderKL)
    the shards hold latent mean/std instead of pixels. Returns the index."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "index.json").exists():
        raise FileExistsError(f"{out} already holds shards (index.json); convert into an empty folder")
    grid = [tuple(map(int, b)) for b in buckets] if buckets else make_buckets(resolution, step, BUCKET_RATIOS)
    writer = _ShardWriter(out, shard_size)
    pending: dict[int, list[tuple[str, str, Any]]] = {}  # bucket -> images waiting for one VAE batch

    def encode(bucket: int) -> None:
        group = pending.pop(bucket, [])
        if not group:
            return
        x = torch.stack([to_model_pixels(np.array(im)[None])[0] for _, _, im in group]).to(vae_device, vae_dtype)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        for j, (key, caption, _) in enumerate(group):
            blob = save_bytes({"mean": dist.mean[j].float().cpu().half().contiguous(),
                               "std": dist.std[j].float().cpu().half().contiguous()})
            writer.add(key, bucket, caption, {"latent": blob})

    for i, (path, caption) in enumerate(scan_folder(src)):
        with Image.open(path) as im:
            bucket = nearest_bucket(im.width, im.height, grid)
            image = resize_cover_crop(im, grid[bucket])
        key = f"{i:09d}"
        if vae is None:
            writer.add(key, bucket, caption, {"png": _png(image)})
            continue
        pending.setdefault(bucket, []).append((key, caption, image))
        if len(pending[bucket]) >= vae_batch:
            encode(bucket)
    for bucket in list(pending):
        encode(bucket)
    config = getattr(vae, "config", None)
    index = {"format": FORMAT, "kind": "pixels" if vae is None else "latents", "buckets": [list(b) for b in grid],
             "resolution": resolution, "step": step, "shards": writer.finish(),
             "latent_scale": [float(getattr(config, "scaling_factor", 1.0) or 1.0),
                              float(getattr(config, "shift_factor", 0.0) or 0.0)],
             "latent_channels": int(getattr(config, "latent_channels", 0) or 0)}
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
class ShardSet:
    """An opened shard folder: its index, and each shard's item list when asked (one cached)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        path = self.root / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not a shard folder (no index.json); make one with "
                                    f"`python -m lidit convert shards <image folder> {self.root}`")
        self.index = json.loads(path.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.names = [s["name"] for s in self.index["shards"]]
        self.buckets = [tuple(b) for b in self.index["buckets"]]
        self.latent = self.index["kind"] == "latents"
        self._cached: tuple[int, list[Item]] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def items(self, shard: int) -> list[Item]:
        if self._cached is None or self._cached[0] != shard:
            rows = json.loads((self.root / f"{self.names[shard]}.json").read_text())["items"]
            self._cached = (shard, [Item(k, b, c, {e: tuple(v) for e, v in m.items()}) for k, b, c, m in rows])
        return self._cached[1]

    def captions(self, limit: int) -> list[str]:
        """The first `limit` captions in shard order, reading item lists only as far as needed."""
        out: list[str] = []
        for s in range(len(self)):
            if len(out) >= limit:
                break
            out += [it.caption for it in self.items(s)]
        return out[:limit]


def reader_plan(shards: ShardSet, seed: int, reader: int, readers: int,
                micro: int) -> Iterator[list[tuple[int, Item]]]:
    """[(shard, item), ...] of every micro-batch of one reader, epoch after epoch, forever; see the
    module docstring. A batch may hold items of an earlier shard that waited for their bucket to fill."""
    epoch = 0
    while True:
        order = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5A4D])).permutation(len(shards))
        waiting: dict[int, list[tuple[int, Item]]] = {}
        for shard in order[reader::readers].tolist():
            items = shards.items(shard)
            perm = np.random.default_rng(np.random.SeedSequence([seed, epoch, shard, 0x17E])).permutation(len(items))
            for j in perm.tolist():
                it = items[j]
                group = waiting.setdefault(it.bucket, [])
                group.append((shard, it))
                if len(group) == micro:
                    yield group
                    waiting[it.bucket] = []
        epoch += 1


class _OpenShards:
    """A reader's open tar files: the few most recently used stay open."""

    def __init__(self, shards: ShardSet, keep: int = 4) -> None:
        self.shards, self.keep = shards, keep
        self.files: dict[int, Any] = {}

    def read(self, shard: int, member: tuple[int, int]) -> bytes:
        f = self.files.pop(shard, None) or open(self.shards.root / f"{self.shards.names[shard]}.tar", "rb")
        self.files[shard] = f  # most recent last
        if len(self.files) > self.keep:
            self.files.pop(next(iter(self.files))).close()
        f.seek(member[0])
        return f.read(member[1])

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


class _Readers(torch.utils.data.IterableDataset):
    """What DataLoader workers iterate: worker w plays the reader that serves batch `consumed + w` next."""

    def __init__(self, stream: ShardStream, consumed: int) -> None:
        self.stream, self.consumed = stream, consumed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info else 0
        yield from self.stream.batches_from(self.consumed + w)


class ShardStream:
    """The trainer's stream over a shard folder: micro-batches of (inputs, captions, features).

    Batch n of this rank comes from reader n % V at its position n // V; DataLoader workers fetch
    them in parallel (worker w serves batches w, w + V, ...), prefetch, and pin memory for CUDA.
    """

    def __init__(self, root: str | os.PathLike, micro: int, seed: int, rank: int = 0, world: int = 1,
                 workers: int = 0, prefetch: int = 2, pin_memory: bool = False,
                 features: Sequence[ShardFeatures] = ()) -> None:
        self.shards = ShardSet(root)
        self.micro, self.seed, self.rank, self.world = micro, seed, rank, world
        self.workers, self.prefetch, self.pin_memory = workers, prefetch, pin_memory
        self.readers = max(1, workers)
        self.features = list(features)
        self.consumed = 0
        self._it: Iterator | None = None
        if len(self.shards) < world * self.readers:
            raise ValueError(f"{self.shards.root} has {len(self.shards)} shards for {world} processes x {self.readers} "
                             "readers: every reader needs at least one shard; convert with a smaller --shard-size "
                             "or use fewer workers")
        scale, shift = self.shards.index["latent_scale"]
        self.latent_scale = (scale, shift)

    def batches_from(self, n: int) -> Iterator[tuple]:
        """Batches n, n + V, n + 2V, ... of this rank (V = readers per rank)."""
        local = n % self.readers
        reader = self.rank * self.readers + local
        plan = reader_plan(ShardSet(self.shards.root), self.seed, reader, self.world * self.readers, self.micro)
        position = n // self.readers
        for _ in range(position):  # re-plan up to the resume point: item lists only, no image is read
            next(plan)
        files = _OpenShards(self.shards)
        try:
            for items in plan:
                yield self._load(files, reader, position, items)
                position += 1
        finally:
            files.close()

    def _load(self, files: _OpenShards, reader: int, position: int, items: list[tuple[int, Item]]) -> tuple:
        captions = [it.caption for _, it in items]
        features = [self._entries(f, items) for f in self.features]
        if not self.shards.latent:
            from PIL import Image

            pixels = [np.asarray(Image.open(io.BytesIO(files.read(s, it.members["png"]))).convert("RGB"))
                      for s, it in items]
            return to_model_pixels(np.stack(pixels)), captions, features
        stats = [load_bytes(files.read(s, it.members["latent"])) for s, it in items]
        mean = torch.stack([s["mean"] for s in stats]).float()
        std = torch.stack([s["std"] for s in stats]).float()
        # a fresh latent sample per step, the same one for a given (seed, reader, batch)
        seed = np.random.SeedSequence([self.seed, reader, position, 0x1A7]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(seed))
        scale, shift = self.latent_scale
        return (mean + std * torch.randn(mean.shape, generator=gen) - shift) * scale, captions, features

    def _entries(self, features: ShardFeatures, items: list[tuple[int, Item]]) -> list[Entry]:
        """The batch's memory-mapped states, one file opening per shard the batch touches."""
        by_shard: dict[int, list[int]] = {}
        for i, (s, _) in enumerate(items):
            by_shard.setdefault(s, []).append(i)
        out: list[Entry] = [None] * len(items)  # type: ignore[list-item]
        for s, rows in by_shard.items():
            for i, entry in zip(rows, features.entries(self.shards.names[s], [items[i][1].key for i in rows])):
                out[i] = entry
        return out

    def close(self) -> None:
        """Stop the DataLoader workers now (not whenever the iterator is garbage-collected)."""
        self._it = None

    def _iterator(self) -> Iterator:
        if self.workers == 0:
            return self.batches_from(self.consumed)
        # a worker forked from a rank shares its process group's sockets: start workers afresh there
        context = "forkserver" if torch.distributed.is_initialized() else None
        loader = torch.utils.data.DataLoader(_Readers(self, self.consumed), batch_size=None, num_workers=self.workers,
                                             prefetch_factor=self.prefetch, pin_memory=self.pin_memory,
                                             multiprocessing_context=context)
        return iter(loader)

    def next_batch(self, n: int | None = None) -> tuple[torch.Tensor, list[str], list[list[Entry]]]:
        if n is not None and n != self.micro:
            raise ValueError(f"this stream yields micro batches of {self.micro}, asked for {n}")
        if self._it is None:
            self._it = self._iterator()
        batch = next(self._it)
        self.consumed += 1
        return batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "world": self.world, "readers": self.readers}

    def load_state_dict(self, state: dict | None) -> None:
        """Exact when the layout (processes x readers) is the one saved; otherwise the data order starts
        over from the same number of batches per reader, which repeats or skips some items."""
        self._it = None
        if state is None:
            self.consumed = 0
            return
        if (state["world"], state["readers"]) != (self.world, self.readers):
            warnings.warn(f"the data was read by {state['world']} processes x {state['readers']} readers, now "
                          f"{self.world} x {self.readers}: the data order differs from an uninterrupted run",
                          stacklevel=2)
            self.consumed = state["consumed"] * state["world"] // self.world
            return
        self.consumed = int(state["consumed"])


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict:
    conv = argparse.ArgumentParser(prog="python -m lidit convert shards",
                                   description="Convert a folder of images and same-named .txt captions to tar shards.")
    conv.add_argument("src")
    conv.add_argument("out")
    conv.add_argument("--resolution", type=int, required=True, help="pixels (each bucket keeps about resolution^2)")
    conv.add_argument("--step", type=int, default=16, help="bucket sides are multiples of this (patch x VAE factor)")
    conv.add_argument("--shard-size", type=int, default=1000, help="items per shard")
    conv.add_argument("--vae", help="a local diffusers AutoencoderKL folder: store latent mean/std, not pixels")
    conv.add_argument("--device", default="cpu")
    args = conv.parse_args(argv)
    vae = None
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.vae:
        vae = load_vae(args.vae, args.device, dtype)
    index = convert_folder(args.src, args.out, args.resolution, args.step, shard_size=args.shard_size, vae=vae,
                           vae_device=args.device, vae_dtype=dtype)
    total = sum(s["items"] for s in index["shards"])
    print(f"{total} items in {len(index['shards'])} shards ({index['kind']}) -> {args.out}")
    return index

