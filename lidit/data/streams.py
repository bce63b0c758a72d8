"""Training data: the synthetic scenes stream and image folders with aspect-ratio buckets.

Every stream yields batches of (images, captions) for one process, with images as float tensors
(B, C, H, W): RGB in [-1, 1] for pixel models, VAE latents (scaled and shifted for the model) for
latent ones. Each stream's position is a small JSON-able state, so a resumed run continues with
exactly the batches the uninterrupted run would have drawn.

- `SceneStream`: a fixed pool of distinct training captions (train combinations, training
  templates) from `lidit.scenes`; every batch draws captions from the pool and renders a FRESH
  jittered image for each. Encoding captions is the expensive part, rendering is cheap.
- `FolderData` + `BucketStream`: `name.png` + `name.txt` pairs, each image resized to cover its
  nearest bucket (same pixel count as the base resolution, a few aspect ratios) and centre-cropped.
  A batch always comes from one bucket. With several processes, every global batch (micro batch x
  processes) comes from one bucket and each process takes its slice.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..study import scenes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# width:height ratios of the default buckets (each bucket keeps about the base pixel count)
BUCKET_RATIOS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))


def to_model_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state


# ------------------------------------------------------------------------------------------------
# synthetic scenes
# ------------------------------------------------------------------------------------------------
class SceneStream:
    """Fresh renders of scenes from a fixed caption pool; one independent stream per process."""

    def __init__(self, pool: Sequence[scenes.Example], size: int, seed: int, rank: int = 0) -> None:
        if not pool:
            raise ValueError("the scene pool is empty")
        self.pool, self.size = list(pool), size
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, rank, 0x5CE2E]))

    @classmethod
    def from_config(cls, pool_size: int, size: int, seed: int, rank: int = 0, pool_seed: int | None = None,
                    n_objects: int | Sequence[int] | None = None,
                    styles: Sequence[str] = scenes.DEFAULT_TRAIN_STYLES) -> SceneStream:
        pool = scenes.train_pool(seed if pool_seed is None else pool_seed, pool_size, n_objects=n_objects,
                                 styles=styles)
        return cls(pool, size, seed, rank)

    @property
    def captions(self) -> list[str]:
        return [ex.prompt for ex in self.pool]

    def next_batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        images, prompts, _ = scenes.sample_batch(self.rng, n, self.size, self.pool)
        return to_model_pixels(images), prompts

    def state_dict(self) -> dict:
        return {"rng": _rng_state(self.rng)}

    def load_state_dict(self, state: dict) -> None:
        _set_rng_state(self.rng, state["rng"])


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------
def make_buckets(resolution: int, step: int, ratios: Sequence[Sequence[int]] = BUCKET_RATIOS) -> list[tuple[int, int]]:
    """(width, height) per ratio, multiples of `step`, about resolution**2 pixels each, no duplicates."""
    out: list[tuple[int, int]] = []
    for rw, rh in ratios:
        ar = rw / rh
        w = max(step, round(resolution * math.sqrt(ar) / step) * step)
        h = max(step, round(resolution / math.sqrt(ar) / step) * step)
        if (w, h) not in out:
            out.append((w, h))
    return out


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest in log space."""
    ar = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ar))


def resize_cover_crop(image, size: tuple[int, int]):
    """Scale a PIL image to cover (w, h) exactly, then centre-crop: deterministic, so cacheable."""
    from PIL import Image

    w, h = size
    scale = max(w / image.width, h / image.height)
    new = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.convert("RGB").resize(new, Image.Resampling.LANCZOS)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    return image.crop((left, top, left + w, top + h))


def scan_folder(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """(image, caption) for every image under `root` with a same-named .txt beside it, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    items, uncaptioned = [], 0
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
            txt = path.with_suffix(".txt")
            if txt.is_file():
                items.append((path, txt.read_text(encoding="utf-8").strip()))
            else:
                uncaptioned += 1
    if uncaptioned:
        warnings.warn(f"{root}: skipped {uncaptioned} image(s) without a same-named .txt caption", stacklevel=2)
    if not items:
        raise ValueError(f"{root} holds no image with a same-named .txt caption ({', '.join(IMAGE_EXTENSIONS)})")
    return items


@dataclass
class FolderItem:
    path: Path
    caption: str
    bucket: int


class FolderData:
    """An image folder assigned to buckets; pixels are loaded on demand, latents come from a cache."""

    def __init__(self, root: str | os.PathLike, resolution: int, step: int,
                 buckets: Sequence[Sequence[int]] | None = None, ratios: Sequence[Sequence[int]] = BUCKET_RATIOS) -> None:
        from PIL import Image

        self.root = Path(root)
        self.buckets = [tuple(map(int, b)) for b in buckets] if buckets else make_buckets(resolution, step, ratios)
        for w, h in self.buckets:
            if w % step or h % step:
                raise ValueError(f"bucket {w}x{h} is not a multiple of {step} pixels")
        self.items: list[FolderItem] = []
        for path, caption in scan_folder(root):
            with Image.open(path) as im:
                w, h = im.size
            self.items.append(FolderItem(path, caption, nearest_bucket(w, h, self.buckets)))
        self.latents: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.latent_scale = (1.0, 0.0)

    @property
    def captions(self) -> list[str]:
        return [it.caption for it in self.items]

    def bucket_sizes(self) -> dict[tuple[int, int], int]:
        sizes = {b: 0 for b in self.buckets}
        for it in self.items:
            sizes[self.buckets[it.bucket]] += 1
        return sizes

    def pixels(self, index: int) -> torch.Tensor:
        """(3, h, w) in [-1, 1], at the item's bucket size."""
        from PIL import Image

        it = self.items[index]
        with Image.open(it.path) as im:
            image = resize_cover_crop(im, self.buckets[it.bucket])
        return to_model_pixels(np.array(image)[None])[0]

    def item_key(self, index: int) -> str:
        it = self.items[index]
        st = it.path.stat()
        return hashlib.sha256(json.dumps([str(it.path.resolve()), st.st_size, st.st_mtime_ns,
                                          self.buckets[it.bucket]]).encode()).hexdigest()

    def sample(self, indices: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        """A batch of model inputs: pixels, or latents drawn from each image's cached distribution."""
        if self.latents is None:
            return torch.stack([self.pixels(i) for i in indices])
        mean = torch.stack([self.latents[i][0] for i in indices]).float()
        std = torch.stack([self.latents[i][1] for i in indices]).float()
        noise = torch.randn(mean.shape, generator=generator)
        scale, shift = self.latent_scale
        return (mean + std * noise - shift) * scale

    # -- latents ---------------------------------------------------------------------------------
    def cache_latents(self, vae: Any, cache_dir: str | os.PathLike, vae_id: str, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, rank: int = 0, world: int = 1,
                      barrier: Callable[[], None] = lambda: None, batch_size: int = 8) -> None:
        """Encode every image once with `vae` (a diffusers AutoencoderKL or alike) and keep the
        latent mean and std on disk (float16 safetensors shards keyed by VAE, file and bucket)."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        cache = Path(cache_dir) / f"vae-{vae_id[:16]}"
        cache.mkdir(parents=True, exist_ok=True)

        def scan() -> dict[str, Path]:
            index = {}
            for shard in sorted(cache.glob("shard-*.safetensors")):
                with safe_open(os.fspath(shard), framework="pt") as f:
                    for k in f.keys():
                        index.setdefault(k.split(".")[0], shard)
            return index

        keys = [self.item_key(i) for i in range(len(self.items))]
        index = scan()
        todo = [i for i in range(len(self.items)) if keys[i] not in index][rank::world]
        by_bucket: dict[int, list[int]] = {}
        for i in todo:
            by_bucket.setdefault(self.items[i].bucket, []).append(i)
        for group in by_bucket.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                x = torch.stack([self.pixels(i) for i in chunk]).to(device, dtype)
                with torch.no_grad():
                    dist = vae.encode(x).latent_dist
                tensors = {}
                for j, i in enumerate(chunk):
                    tensors[f"{keys[i]}.mean"] = dist.mean[j].float().cpu().to(torch.float16).contiguous()
                    tensors[f"{keys[i]}.std"] = dist.std[j].float().cpu().to(torch.float16).contiguous()
                tmp = cache / f".tmp-{uuid.uuid4().hex}"
                save_file(tensors, os.fspath(tmp))
                os.replace(tmp, cache / f"shard-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors")
        barrier()
        index = scan()
        self.latents = {}
        for i, k in enumerate(keys):
            with safe_open(os.fspath(index[k]), framework="pt") as f:
                self.latents[i] = (f.get_tensor(f"{k}.mean"), f.get_tensor(f"{k}.std"))
        config = getattr(vae, "config", None)
        self.latent_scale = (float(getattr(config, "scaling_factor", 1.0) or 1.0),
                             float(getattr(config, "shift_factor", 0.0) or 0.0))


class BucketStream:
    """Batches from one bucket at a time, in an order fixed by (seed, epoch); state = (epoch, cursor).

    Per epoch each bucket's items are shuffled and cut into global batches (micro batch x world);
    a bucket's last batch is completed with items from its start, so every image is seen and every
    batch is full. The batches of all buckets are then shuffled together.
    """

    def __init__(self, data: FolderData, micro_batch: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.data, self.micro, self.seed, self.rank, self.world = data, micro_batch, seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._order: list[list[int]] | None = None
        # latent sampling noise: per process, part of the resumable state
        self.generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, 0xB0C]).generate_state(1)[0]))

    @property
    def captions(self) -> list[str]:
        return self.data.captions

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The global batches of one epoch (lists of micro x world item indices)."""
        size = self.micro * self.world
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0xB0C4E7]))
        batches: list[list[int]] = []
        for b in range(len(self.data.buckets)):
            members = [i for i, it in enumerate(self.data.items) if it.bucket == b]
            if not members:
                continue
            members = [members[j] for j in rng.permutation(len(members))]
            count = math.ceil(len(members) / size)
            padded = [members[j % len(members)] for j in range(count * size)]
            batches += [padded[k * size:(k + 1) * size] for k in range(count)]
        return [batches[j] for j in rng.permutation(len(batches))]

    def next_batch(self, n: int | None = None) -> tuple[torch.Tensor, list[str]]:
        if n is not None and n != self.micro:
            raise ValueError(f"this stream yields micro batches of {self.micro}, asked for {n}")
        if self._order is None:
            self._order = self.epoch_batches(self.epoch)
        if self.cursor >= len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self.epoch_batches(self.epoch)
        batch = self._order[self.cursor][self.rank * self.micro:(self.rank + 1) * self.micro]
        self.cursor += 1
        return self.data.sample(batch, self.generator), [self.data.items[i].caption for i in batch]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "generator": self.generator.get_state().numpy().tobytes().hex()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None
        self.generator.set_state(torch.frombuffer(bytearray.fromhex(state["generator"]), dtype=torch.uint8))
