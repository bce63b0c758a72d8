"""The frozen-LLM feature cache: each caption is encoded once per (LLM, layer, template) and kept on disk.

Training never runs an LLM in its loop: before the first step every caption the data can produce
(plus the empty prompt, the unconditional input of classifier-free guidance) is looked up here, the
missing ones are encoded, and from then on batches are assembled from the cache.

What is stored, and why it is enough:
- The scaffolding before the prompt (system prompt, chat template, instruction) is the same token
  sequence for every caption, and the LLM is causal, so its hidden states never depend on the
  caption. They are computed and stored ONCE per group (`prefix.safetensors`), and the LLM's KV
  cache for them is reused while encoding the captions, which then only run their own tokens.
- Per caption, the hidden states of its prompt tokens and of the scaffolding after it (the
  assistant turn of a chat template), plus the number of prompt tokens.
- Per-caption tensors are kept in float16 (bfloat16 for an entry that would overflow float16); the
  prefix, stored once and holding the huge first-token activations of some LLMs, in float32.

`prefix + suffix` rebuilds exactly what `lidit.llm.encode` returns for the caption (up to float
rounding of the two orderings of the same computation; the tests check it).

Layout: `<cache root>/<llm folder name>-<group hash>/` holds `prefix.safetensors` and shards
`shard-*.safetensors`; each shard's tensors are named by the caption key, and its metadata maps
keys to captions and prompt-token counts. The group hash covers the LLM folder's identity (config,
tokenizer files, weight file sizes and head/tail bytes), the layer, the template, `max_tokens` and
the storage dtype; the caption key adds the caption. Shards are written to a temporary name and
renamed, so an interrupted run leaves only whole shards behind, and several processes (the ranks
of one run, or concurrent runs) may add shards to one group.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..instruction import PromptTemplate, template_ids, tokenize_prompts
from ..llm import LLM, encode, layers_needed
from ..precision import DTYPES
from ..states import TextStates
from ..text_encoder_file import TextEncoderFile

FORMAT = "lidit-features-v1"
_IDENTITY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "tokenizer.model", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                   "vocab.json", "merges.txt")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_PROBE = 1 << 20  # bytes hashed at each end of a weight file


def _sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _probe(f: Path, name: str) -> list[str | bytes]:
    """A weight file's name, size and first and last MiB."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        head = fh.read(_PROBE)
        fh.seek(max(0, size - _PROBE))
        tail = fh.read(_PROBE)
    return [name, str(size), head, tail]


def _small_files(path: Path) -> list[str | bytes]:
    """The config and tokenizer files of a folder, whole."""
    parts: list[str | bytes] = []
    for name in _IDENTITY_FILES:
        f = path / name
        if f.is_file():
            parts += [name, f.read_bytes()]
    return parts


def folder_identity(path: str | os.PathLike) -> str:
    """A fingerprint of an HF model folder that does not depend on where it lies or its mtimes.

    Hashes the config and tokenizer files whole, and every weight file's name, size and first and
    last MiB: enough to tell models and conversions apart, cheap for multi-GB folders.
    """
    path = Path(path)
    parts = _small_files(path)
    for f in sorted(path.rglob("*")):
        if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
            parts += _probe(f, str(f.relative_to(path)))
    if not parts:
        raise FileNotFoundError(f"{path} holds no model files to identify")
    return _sha(*parts)


def llm_identity(llm: str | os.PathLike | TextEncoderFile) -> str:
    """folder_identity of an HF folder; for a text-encoder file, the file (name, size, head and tail),
    the family (it sets the architecture's constants) and the tokenizer folder's files."""
    if not isinstance(llm, TextEncoderFile):
        return folder_identity(llm)
    tokenizer = _small_files(llm.tokenizer)
    if not tokenizer:
        raise FileNotFoundError(f"{llm.tokenizer} holds no tokenizer files to identify")
    return _sha("text-encoder-file", llm.family, *_probe(llm.path, llm.path.name), *tokenizer)


# ------------------------------------------------------------------------------------------------
# encoding with a shared, cached prefix
# ------------------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """One caption's states after the shared prefix: prompt tokens, then trailing scaffolding."""

    suffix: torch.Tensor  # (Ls, D)
    n_prompt: int


class PrefixEncoder:
    """Encodes captions behind a shared template prefix, running the prefix through the LLM once.

    The prefix's KV cache is copied (and repeated over the batch) for every batch of captions, so
    each caption costs only its own tokens. If the LLM was loaded with more layers than the one
    read, or `reuse_prefix` is off, it falls back to plain `lidit.llm.encode` and splits the result.
    """

    def __init__(self, llm: LLM, template: PromptTemplate, max_tokens: int, layer: int = -3,
                 reuse_prefix: bool = True) -> None:
        self.llm, self.template, self.max_tokens, self.layer = llm, template, max_tokens, layer
        self.k = layers_needed(llm.total_layers, layer)
        if self.k > len(llm.layers):
            raise ValueError(f"{llm.name} was loaded with {len(llm.layers)} layers; layer {layer} needs {self.k}")
        self.before, _ = template_ids(llm.tokenizer, template)
        self.fast = reuse_prefix and not llm.is_encoder and self.k == len(llm.layers) and self.k > 0
        self.calls = 0  # LLM forward passes, for tests and stats
        # transformers >= 5.2x names the KV cache argument `cache`, older versions `past_key_values`
        params = inspect.signature(llm.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._cache = None
        self.prefix = self._encode_prefix()

    def _forward(self, **kwargs):
        self.calls += 1
        return self.llm.model(**kwargs)

    def _finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm.final_norm(hidden) if self.k == self.llm.total_layers else hidden

    @torch.no_grad()
    def _encode_prefix(self) -> torch.Tensor:
        d = self.llm.hidden_size
        if not self.before:
            return torch.zeros(0, d)
        if not self.fast:
            self.calls += 1
            states = encode(self.llm, [""], self.template, self.max_tokens, self.layer)
            return states.hidden[0, :len(self.before)].float().cpu()
        ids = torch.tensor([self.before], device=self.llm.device)
        out = self._forward(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        self._cache = out.get(self._cache_arg)
        if self._cache is None:
            raise RuntimeError(f"{self.llm.name} returned no KV cache for the template prefix")
        return self._finish(out.last_hidden_state)[0].float().cpu()

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> list[Encoded]:
        if not captions:
            return []
        batch = tokenize_prompts(self.llm.tokenizer, list(captions), self.template, self.max_tokens)
        lp = len(self.before)
        if lp and batch.input_ids[:, :lp].tolist() != [self.before] * len(captions):
            raise RuntimeError(f"{self.llm.name}: the template prefix is not the same for every caption")
        lengths = batch.mask.sum(1).tolist()
        n_prompt = batch.prompt.sum(1).tolist()
        if not self.fast:
            self.calls += 1
            hidden = encode(self.llm, list(captions), self.template, self.max_tokens, self.layer).hidden.cpu()
        else:
            ids = batch.input_ids[:, lp:].to(self.llm.device)
            if ids.shape[1] == 0:  # e.g. the empty prompt without a chat template: nothing after the prefix
                return [Encoded(torch.zeros(0, self.llm.hidden_size), 0) for _ in captions]
            mask = batch.mask.to(self.llm.device).long()
            kwargs = dict(input_ids=ids, attention_mask=mask, use_cache=True)
            if lp:
                cache = copy.deepcopy(self._cache)
                cache.batch_repeat_interleave(len(captions))
                kwargs[self._cache_arg] = cache
            suffix = self._finish(self._forward(**kwargs).last_hidden_state).float().cpu()
            hidden = torch.cat([torch.zeros(len(captions), lp, suffix.shape[-1]), suffix], dim=1)
        return [Encoded(hidden[i, lp:lengths[i]].clone(), int(n_prompt[i])) for i in range(len(captions))]


# ------------------------------------------------------------------------------------------------
# the on-disk cache of one branch
# ------------------------------------------------------------------------------------------------
def _atomic_save(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary name, then rename: readers only ever see whole files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    save_file(tensors, os.fspath(tmp), metadata={"format": FORMAT, **metadata})
    os.replace(tmp, path)


def _store(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    if dtype == torch.float16 and not torch.isfinite(y).all():
        y = x.to(torch.bfloat16)  # beyond float16's range (some LLMs have huge activations)
    return y.contiguous()


Entry = tuple[torch.Tensor, int]  # one caption's states after the template prefix, and its prompt-token count


def assemble(prefix: torch.Tensor, items: Sequence[Entry], device: torch.device | str = "cpu") -> TextStates:
    """Prefix + each caption's suffix, right-padded: what `lidit.llm.encode` gives for the captions."""
    lp, d = prefix.shape
    n = max(1, lp + max([s.shape[0] for s, _ in items] + [0]))
    hidden = torch.zeros(len(items), n, d)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    prompt = torch.zeros_like(mask)
    hidden[:, :lp] = prefix.float()
    for i, (suffix, n_prompt) in enumerate(items):
        hidden[i, lp:lp + suffix.shape[0]] = suffix.float()
        mask[i, :lp + suffix.shape[0]] = True
        prompt[i, lp:lp + n_prompt] = True
    return TextStates(hidden, mask, prompt).to(device)


def channel_stats(suffixes: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of every channel over the captions' own tokens, for `FeatureNorm`.

    The shared template prefix is left out: it is the same for every caption, and its BOS
    token alone would inflate the std of the massive channels. Float64 sums, because raw
    values near 1e5 squared lose float32 precision.
    """
    total, sq, n = 0.0, 0.0, 0
    for suffix in suffixes:
        x = suffix.double()
        total = total + x.sum(0)
        sq = sq + (x * x).sum(0)
        n += x.shape[0]
    if n < 2:
        raise ValueError("channel statistics need at least two caption tokens")
    mean = total / n
    std = (sq / n - mean * mean).clamp(min=0).sqrt()
    return mean.float(), std.clamp(min=1e-3 * float(std.mean())).float()


def feature_group(identity: str, layer: int, template: PromptTemplate, max_tokens: int, dtype: str) -> str:
    """The hash that names one branch's features: LLM, layer, template, token limit, storage dtype."""
    return _sha(FORMAT, identity, str(layer), template.instruction, template.system_prompt,
                str(template.chat_template), str(max_tokens), dtype)


@dataclass
class FeatureTable:
    """The cached states of a set of captions, in memory, assembled into batches on demand."""

    prefix: torch.Tensor                                 # (Lp, D), storage dtype
    entries: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # caption -> (suffix, n_prompt)

    @property
    def hidden_size(self) -> int:
        return self.prefix.shape[-1]

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_stats(suffix for suffix, _ in self.entries.values())

    def states(self, captions: Sequence[str], device: torch.device | str = "cpu",
               entries: Sequence[Entry] | None = None) -> TextStates:
        """The TextStates that `lidit.llm.encode` gives for these captions (float32). `entries` is the
        per-batch input of the memory-mapped source; the table holds every caption itself."""
        return assemble(self.prefix, [self.entries[c] for c in captions], device)


class FeatureCache:
    """The cached features of one LLM branch (one LLM folder or text-encoder file, layer, template and token limit)."""

    def __init__(self, root: str | os.PathLike, llm_path: str | os.PathLike | TextEncoderFile, layer: int,
                 template: PromptTemplate, max_tokens: int, dtype: str = "float16") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"feature dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.layer, self.template, self.max_tokens = layer, template, max_tokens
        self.dtype = DTYPES[dtype]
        dtype = str(self.dtype).removeprefix("torch.")  # one cache group per dtype, whatever its name
        self.identity = llm_identity(llm_path)
        self.group = feature_group(self.identity, layer, template, max_tokens, dtype)
        self.name = llm_path.name if isinstance(llm_path, TextEncoderFile) else Path(llm_path).name
        self.dir = Path(root) / f"{self.name}-{self.group[:16]}"
        self.stats = {"encoded": 0, "cached": 0, "llm_calls": 0, "seconds": 0.0}
        self._index: dict[str, Path] = {}

    def key(self, caption: str) -> str:
        return _sha(self.group, caption)

    def _scan(self) -> None:
        self._index = {}
        if not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            with safe_open(os.fspath(shard), framework="pt") as f:
                meta = f.metadata() or {}
            for k in json.loads(meta.get("entries", "{}")):
                self._index.setdefault(k, shard)

    def missing(self, captions: Iterable[str]) -> list[str]:
        """Unique captions not yet in the cache, in first-seen order."""
        self._scan()
        seen: dict[str, None] = {}
        for c in captions:
            if c not in seen and self.key(c) not in self._index:
                seen[c] = None
        return list(seen)

    @property
    def has_prefix(self) -> bool:
        return (self.dir / "prefix.safetensors").is_file()

    def build(self, captions: Sequence[str], load: Callable[[], LLM], batch_size: int = 64,
              write_prefix: bool = True, shard_size: int = 2048, reuse_prefix: bool = True,
              progress: Callable[[int, int], None] | None = None) -> None:
        """Encode `captions` that are not cached yet (the caller may pass its share of them only).

        `load` is only called when there is something to encode, so a fully cached run never
        touches the LLM. Shards are flushed every `shard_size` captions, so an interrupted build
        keeps its progress.
        """
        todo = self.missing(captions)
        need_prefix = write_prefix and not self.has_prefix
        if not todo and not need_prefix:
            return
        started = time.perf_counter()
        llm = load()
        encoder = PrefixEncoder(llm, self.template, self.max_tokens, self.layer, reuse_prefix)
        if need_prefix:
            # float32: stored once, and the first token of some LLMs exceeds float16's range (Gemma 3: ~1e5)
            _atomic_save({"prefix": encoder.prefix.float().contiguous()}, self.dir / "prefix.safetensors",
                              {"tokens": json.dumps(encoder.before), "llm": self.name})
        # Similar lengths together: less padding per batch.
        todo = sorted(todo, key=len)
        pending: dict[str, torch.Tensor] = {}
        entries: dict[str, list] = {}

        def flush() -> None:
            if pending:
                name = f"shard-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
                _atomic_save(dict(pending), self.dir / name, {"entries": json.dumps(entries)})
                pending.clear()
                entries.clear()

        done = 0
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            for caption, enc in zip(chunk, encoder.encode(chunk)):
                k = self.key(caption)
                pending[k] = _store(enc.suffix, self.dtype)
                entries[k] = [enc.n_prompt, caption]
            done += len(chunk)
            if progress:
                progress(done, len(todo))
            if len(pending) >= shard_size:
                flush()
        flush()
        self.stats["encoded"] += len(todo)
        self.stats["llm_calls"] += encoder.calls
        self.stats["seconds"] += time.perf_counter() - started

    def load(self, captions: Iterable[str]) -> FeatureTable:
        """All of `captions` from disk into memory; every one must be cached already."""
        self._scan()
        if not self.has_prefix:
            raise FileNotFoundError(f"feature cache {self.dir} has no prefix.safetensors: build it first")
        prefix = load_file(os.fspath(self.dir / "prefix.safetensors"))["prefix"]
        wanted: dict[Path, dict[str, str]] = {}
        unique = dict.fromkeys(captions)
        for c in unique:
            k = self.key(c)
            if k not in self._index:
                raise KeyError(f"caption not in the feature cache {self.dir}: {c[:80]!r}")
            wanted.setdefault(self._index[k], {})[k] = c
        table = FeatureTable(prefix)
        for shard, keys in wanted.items():
            with safe_open(os.fspath(shard), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["entries"])
                for k, c in keys.items():
                    table.entries[c] = (f.get_tensor(k), int(meta[k][0]))
        self.stats["cached"] = len(table.entries)
        return table


# ------------------------------------------------------------------------------------------------
# memory-mapped features beside data shards (`text_features: offline` on a shard folder)
# ------------------------------------------------------------------------------------------------
class ShardFeatures:
    """One branch's states for a shard folder: `prefix.safetensors` (the template prefix and the empty
    caption) and one file per data shard, memory-mapped and read per batch, never all in RAM."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        path = self.folder / "prefix.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: encode the shards' captions first (`encode_shards`)")
        with safe_open(os.fspath(path), framework="pt") as f:
            self.prefix, self.empty = f.get_tensor("prefix"), (f.get_tensor("empty"), 0)

    def entries(self, shard: str, keys: Sequence[str]) -> list[Entry]:
        with safe_open(os.fspath(self.folder / f"{shard}.safetensors"), framework="pt") as f:
            counts = json.loads(f.metadata()["prompt_tokens"])
            return [(f.get_tensor(k), int(counts[k])) for k in keys]

    def states(self, captions: Sequence[str], device: torch.device | str,
               entries: Sequence[Entry]) -> TextStates:
        """A batch's TextStates; a caption dropped to "" gets the empty caption's states."""
        return assemble(self.prefix, [self.empty if c == "" else e for c, e in zip(captions, entries)], device)

    def channel_stats(self, max_captions: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """`FeatureNorm` statistics from the first shards' captions (up to `max_captions`)."""
        def suffixes() -> Iterator[torch.Tensor]:
            seen = 0
            for path in sorted(self.folder.glob("shard-*.safetensors")):
                with safe_open(os.fspath(path), framework="pt") as f:
                    for k in f.keys():
                        if seen >= max_captions:
                            return
                        seen += 1
                        yield f.get_tensor(k)
        return channel_stats(suffixes())


def encode_shards(folder: Path, names: Sequence[str], captions_of: Callable[[int], list[tuple[str, str]]],
                  load: Callable[[], LLM], template: PromptTemplate, max_tokens: int, layer: int, dtype: str,
                  batch_size: int = 64, rank: int = 0, world: int = 1, write_prefix: bool = True) -> int:
    """Write the feature file of every data shard that lacks one (ranks take every world-th shard).

    `captions_of(i)` lists shard i's (key, caption). The LLM is loaded only if something is missing.
    Returns the number of captions encoded here."""
    todo = [i for i in range(rank, len(names), world) if not (folder / f"{names[i]}.safetensors").is_file()]
    need_prefix = write_prefix and not (folder / "prefix.safetensors").is_file()
    if not todo and not need_prefix:
        return 0
    encoder = PrefixEncoder(load(), template, max_tokens, layer)
    store = DTYPES[dtype]

    if need_prefix:
        empty = encoder.encode([""])[0]
        _atomic_save({"prefix": encoder.prefix.float().contiguous(), "empty": empty.suffix.float().contiguous()},
             folder / "prefix.safetensors", {})
    done = 0
    for i in todo:
        rows = captions_of(i)
        tensors, counts = {}, {}
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            for (key, _), enc in zip(chunk, encoder.encode([c for _, c in chunk])):
                tensors[key], counts[key] = _store(enc.suffix, store), enc.n_prompt
        _atomic_save(tensors, folder / f"{names[i]}.safetensors", {"prompt_tokens": json.dumps(counts)})
        done += len(rows)
    return done
