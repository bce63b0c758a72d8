"""What the loop consumes: the image/latent stream and, per LLM branch, a source of text states.

Text sources (`text_features`):
- offline, scenes or an image folder: every caption encoded once into the on-disk cache, all loaded
  into RAM (`FeatureTable`): the small-data fast path;
- offline, a shard folder: one memory-mapped feature file per data shard (`ShardFeatures`), written
  once and read per batch by the DataLoader workers, never all in RAM;
- online: the frozen LLM, cut at the used layer, encodes each batch in the loop (`OnlineText`);
  replicated on every rank.
Each has `states(captions, device, entries)` (entries: a batch's memory-mapped states, or None) and
`channel_stats()` for a fresh model's `FeatureNorm`."""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from ..config import LIDiTConfig
from ..data.features import (
    Entry,
    FeatureCache,
    FeatureTable,
    PrefixEncoder,
    ShardFeatures,
    channel_stats,
    encode_shards,
    feature_group,
    folder_identity,
    llm_identity,
)
from ..data.shards import ShardStream
from ..data.streams import BucketStream, FolderData, SceneStream
from ..instruction import PromptTemplate
from ..llm import LLM, encode, load_llm
from ..precision import resolve_dtype
from ..states import TextStates
from ..study import scenes
from ..text_encoder_file import TextEncoderFile
from ..vae import load_vae
from .config import TrainConfig
from .dist import Dist, say


def make_stream(cfg: TrainConfig, model_cfg: LIDiTConfig, d: Dist, micro: int, resolution: int):
    src = cfg.data.source
    latent = model_cfg.latent_format != "pixel"
    if src.startswith("shards:"):
        stream = ShardStream(src.split(":", 1)[1], micro, cfg.seed, d.rank, d.world, cfg.data.workers,
                             cfg.data.prefetch, pin_memory=d.device.type == "cuda")
        have = stream.shards.latent
        if have != latent:
            raise ValueError(f"{src} holds {'latents' if have else 'pixels'}, the model takes "
                             f"{model_cfg.latent_format if latent else 'pixels'}: convert the images "
                             f"{'with' if latent else 'without'} --vae")
        channels = stream.shards.index["latent_channels"] if have else 3
        if channels != model_cfg.dit.in_channels:
            raise ValueError(f"{src} holds {channels}-channel inputs, the model takes {model_cfg.dit.in_channels}")
        _check_latent_constants(stream.latent_scale, model_cfg)
        return stream
    if src == "scenes":
        if latent or model_cfg.dit.in_channels != 3:
            raise ValueError("the synthetic scenes are RGB pixels: they need a pixel model (latent_format 'pixel', "
                             "in_channels 3)")
        return SceneStream.from_config(cfg.data.pool_size, resolution, cfg.seed, d.rank, cfg.data.pool_seed,
                                       cfg.data.n_objects, scenes.training_styles(cfg.data.styles))
    root = src.split(":", 1)[1]
    factor = 8 if latent else 1
    step = model_cfg.dit.patch * factor
    buckets = None
    if isinstance(cfg.data.buckets, list):
        buckets = cfg.data.buckets
    elif cfg.data.buckets == "none":
        buckets = [(resolution, resolution)]
    data = FolderData(root, resolution, step, buckets=buckets)
    say(d, "buckets (w x h: images): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in data.bucket_sizes().items() if n))
    if latent:
        if not cfg.data.vae:
            raise ValueError(f"this model works in {model_cfg.latent_format} latents (in_channels "
                             f"{model_cfg.dit.in_channels}): set data.vae to a local diffusers AutoencoderKL folder")
        vae_dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
        vae = load_vae(cfg.data.vae, d.device, vae_dtype)
        attach_vae(data, vae, cfg, model_cfg, d, folder_identity(cfg.data.vae), vae_dtype)
        del vae
    elif model_cfg.dit.in_channels != 3:
        raise ValueError(f"a pixel model needs in_channels 3, got {model_cfg.dit.in_channels}")
    return BucketStream(data, micro, cfg.seed, d.rank, d.world)


# ComfyUI's latent formats; the VAE's own constants must agree, or the host decodes wrongly.
LATENT_CONSTANTS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}


def attach_vae(data: FolderData, vae, cfg: TrainConfig, model_cfg: LIDiTConfig, d: Dist, vae_id: str,
               dtype: torch.dtype = torch.float32) -> None:
    channels = getattr(getattr(vae, "config", None), "latent_channels", model_cfg.dit.in_channels)
    if channels != model_cfg.dit.in_channels:
        raise ValueError(f"the VAE makes {channels}-channel latents, the model takes {model_cfg.dit.in_channels}")
    t0 = time.perf_counter()
    data.cache_latents(vae, Path(cfg.cache_dir) / "latents", vae_id, d.device, dtype, d.rank, d.world, d.barrier)
    _check_latent_constants(data.latent_scale, model_cfg)
    say(d, f"latents: {len(data.items)} images cached in {time.perf_counter() - t0:.1f} s")


def _check_latent_constants(scale_shift: tuple[float, float], model_cfg: LIDiTConfig) -> None:
    scale, shift = scale_shift
    want = LATENT_CONSTANTS.get(model_cfg.latent_format)
    if want and (abs(scale - want[0]) > 1e-3 or abs(shift - want[1]) > 1e-3):
        warnings.warn(f"the VAE scales latents by {scale} and shifts by {shift}, but latent_format "
                      f"{model_cfg.latent_format!r} decodes with {want}: the checkpoint will decode wrongly in ComfyUI",
                      stacklevel=2)


def cache_features(cfg: TrainConfig, model_cfg: LIDiTConfig, folders: list[Path | TextEncoderFile], captions: list[str],
                   d: Dist) -> tuple[list[FeatureTable], list[dict]]:
    """Encode what is missing (ranks split the work), then load every caption's features."""
    template = PromptTemplate.of(model_cfg.text)
    llm_dtype = resolve_dtype(cfg.llm_dtype, d.device)
    tables, stats = [], []
    threads = torch.get_num_threads()
    if cfg.llm_threads:
        torch.set_num_threads(cfg.llm_threads)
    wanted = list(dict.fromkeys([""] + captions))  # "" = the dropped caption and the unconditional input
    for folder, branch in zip(folders, model_cfg.text.branches):
        cache = FeatureCache(Path(cfg.cache_dir) / "features", folder, branch.layer, template,
                             model_cfg.text.max_tokens, cfg.feature_dtype)
        todo = cache.missing(wanted)
        d.barrier()  # everyone has scanned before anyone writes, so the split below is the same everywhere
        if todo:
            say(d, f"features: {branch.name}: {len(todo)} of {len(wanted)} captions to encode")
        started, last = time.perf_counter(), [0.0]

        def progress(done: int, total: int) -> None:
            now = time.perf_counter()
            if d.main and (now - last[0] > 5 or done == total):
                last[0] = now
                rate = done / max(now - started, 1e-9)
                say(d, f"features: {branch.name}: {done}/{total} on rank 0 ({rate:.1f} captions/s)")

        cache.build(todo[d.rank::d.world],
                    lambda folder=folder, branch=branch: _quiet_load(folder, branch.layer, llm_dtype, d.device),
                    batch_size=cfg.llm_batch_size, write_prefix=d.main, progress=progress)
        d.barrier()
        tables.append(cache.load(wanted))
        stats.append({"branch": branch.name, "folder": str(folder), "identity": cache.identity, "dir": str(cache.dir),
                      **cache.stats})
        if d.device.type == "cuda":
            torch.cuda.empty_cache()
    torch.set_num_threads(threads)
    return tables, stats


def _quiet_load(folder: Path | TextEncoderFile, layer: int, dtype: torch.dtype, device: torch.device):
    """load_llm (or a text-encoder file's load) without transformers' per-load progress bars in the training log."""
    if isinstance(folder, TextEncoderFile):
        return folder.load(layer=layer, dtype=dtype, device=device)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_llm(folder, layer=layer, dtype=dtype, device=device)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


class OnlineText:
    """`text_features: online`: the frozen LLM encodes every batch in the loop (no cache on disk)."""

    def __init__(self, llm: LLM, template: PromptTemplate, max_tokens: int, layer: int, sample: list[str]) -> None:
        self.llm, self.template, self.max_tokens, self.layer = llm, template, max_tokens, layer
        self.sample = sample  # captions for a fresh model's FeatureNorm statistics

    @torch.no_grad()
    def states(self, captions: list[str], device: torch.device, entries: list[Entry] | None = None) -> TextStates:
        return encode(self.llm, captions, self.template, self.max_tokens, self.layer).to(device)

    def channel_stats(self, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        encoder = PrefixEncoder(self.llm, self.template, self.max_tokens, self.layer)
        return channel_stats(e.suffix for i in range(0, len(self.sample), batch)
                             for e in encoder.encode(self.sample[i:i + batch]))


STATS_CAPTIONS = 4096  # captions whose states give a fresh model's FeatureNorm statistics


def text_sources(cfg: TrainConfig, model_cfg: LIDiTConfig, folders: list[Path | TextEncoderFile], stream,
                 d: Dist) -> tuple[list, list[dict]]:
    """Per branch, where the loop gets text states from, and what it cost (for the run's stats)."""
    template = PromptTemplate.of(model_cfg.text)
    llm_dtype = resolve_dtype(cfg.llm_dtype, d.device)
    if cfg.text_features == "online":
        sources, stats = [], []
        sample = _sample_captions(stream, STATS_CAPTIONS)
        for folder, branch in zip(folders, model_cfg.text.branches):
            sources.append(OnlineText(_quiet_load(folder, branch.layer, llm_dtype, d.device), template,
                                      model_cfg.text.max_tokens, branch.layer, sample))
            stats.append({"branch": branch.name, "folder": str(folder), "mode": "online", "encoded": 0})
        return sources, stats
    if isinstance(stream, ShardStream):
        return _shard_features(cfg, model_cfg, folders, stream, template, llm_dtype, d)
    return cache_features(cfg, model_cfg, folders, stream.captions, d)


def _sample_captions(stream, n: int) -> list[str]:
    return stream.shards.captions(n) if isinstance(stream, ShardStream) else stream.captions[:n]


def _shard_features(cfg: TrainConfig, model_cfg: LIDiTConfig, folders: list[Path | TextEncoderFile], stream: ShardStream,
                    template: PromptTemplate, llm_dtype: torch.dtype, d: Dist) -> tuple[list, list[dict]]:
    """Encode the shards that lack a feature file (ranks split them), then memory-map them all."""
    shards = stream.shards
    sources, stats = [], []
    for folder, branch in zip(folders, model_cfg.text.branches):
        group = feature_group(llm_identity(folder), branch.layer, template, model_cfg.text.max_tokens,
                              cfg.feature_dtype)
        out = shards.root / "features" / f"{folder.name}-{group[:16]}"
        t0 = time.perf_counter()
        encoded = encode_shards(out, shards.names, lambda i: [(it.key, it.caption) for it in shards.items(i)],
                                lambda folder=folder, branch=branch: _quiet_load(folder, branch.layer, llm_dtype, d.device),
                                template, model_cfg.text.max_tokens, branch.layer, cfg.feature_dtype,
                                cfg.llm_batch_size, d.rank, d.world, write_prefix=d.main)
        d.barrier()
        if encoded:
            say(d, f"features: {branch.name}: {encoded} captions encoded into {out} ({time.perf_counter() - t0:.1f} s)")
        sources.append(ShardFeatures(out))
        stats.append({"branch": branch.name, "folder": str(folder), "mode": "memory-mapped", "dir": str(out),
                      "encoded": encoded})
    stream.features = sources
    return sources, stats
