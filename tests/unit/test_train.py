"""Training on one process: feature cache, resume, caption dropout, image-folder buckets, config."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import lidit.train as train_mod
import lidit.train.inputs as inputs
import lidit.train.trainer as loop
from lidit.checkpoint import load_checkpoint, read_metadata
from lidit.data.features import FeatureCache, PrefixEncoder
from lidit.data.streams import BucketStream, FolderData, SceneStream, make_buckets, nearest_bucket
from lidit.instruction import PromptTemplate, template_ids
from lidit.llm import encode, load_llm
from lidit.train import TrainConfig, load_config, lr_at, model_config
from lidit.train.state import read_resume_tensors
from lidit.vae import load_vae

torch.set_num_threads(1)
CAPTIONS = ["", "a red circle", "a red circle, a blue square and a green triangle", "x",
            "an image of a yellow square and a cyan circle"]
TEMPLATES = [PromptTemplate(), PromptTemplate(chat_template=False), PromptTemplate(instruction=""),
             PromptTemplate(instruction="", chat_template=False), PromptTemplate(system_prompt="Be precise.")]


def config(tiny_llm_dirs, tmp_path: Path, **kw) -> TrainConfig:
    d = {"model": "tiny", "llms": tiny_llm_dirs, "data": {"source": "scenes", "pool_size": 8},
         "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "steps": 4, "batch_size": 4,
         "log_every": 1, "checkpoint_every": 100, "device": "cpu", "progress": "none", "caption_dropout": 0.25}
    d.update(kw)
    return TrainConfig.from_dict(d)


def quiet_train(cfg: TrainConfig, **kw) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prompt truncation at the tiny preset's max_tokens
        return train_mod.train(cfg, **kw)


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------
def test_prefix_reuse_equals_plain_encode(tiny_llms):
    for llm in tiny_llms:
        for template in TEMPLATES:
            enc = PrefixEncoder(llm, template, 32)
            ref = encode(llm, CAPTIONS, template, 32)
            assert enc.fast or not enc.before
            for i, got in enumerate(enc.encode(CAPTIONS)):
                n = int(ref.mask[i].sum())
                lp = enc.prefix.shape[0]
                torch.testing.assert_close(torch.cat([enc.prefix, got.suffix]), ref.hidden[i, :n], atol=1e-5, rtol=1e-5)
                assert got.n_prompt == int(ref.prompt[i].sum())
                assert ref.prompt[i, lp:lp + got.n_prompt].all()


def test_prefix_reuse_with_sliding_window_attention(tiny_llm_dirs, tmp_path):
    """Gemma 3's sliding-window layers (window 16 here, shorter than prefix + prompt) with a reused KV cache."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(tiny_llm_dirs["tiny-llama"], local_files_only=True)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                           max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    Gemma3ForCausalLM(cfg).save_pretrained(tmp_path / "tiny-gemma3")
    tok.save_pretrained(tmp_path / "tiny-gemma3")
    llm = load_llm(tmp_path / "tiny-gemma3")
    for template in TEMPLATES[:2]:
        enc = PrefixEncoder(llm, template, 32)
        ref = encode(llm, CAPTIONS, template, 32)
        assert enc.fast and enc.prefix.shape[0] > 16
        for i, got in enumerate(enc.encode(CAPTIONS)):
            n = int(ref.mask[i].sum())
            torch.testing.assert_close(torch.cat([enc.prefix, got.suffix]), ref.hidden[i, :n], atol=1e-5, rtol=1e-5)


def test_cache_round_trip_rebuilds_encode(tiny_llm_dirs, tiny_llms, tmp_path):
    template = PromptTemplate()
    for (_name, folder), llm in zip(tiny_llm_dirs.items(), tiny_llms):
        cache = FeatureCache(tmp_path, folder, -3, template, 32)
        cache.build(CAPTIONS, lambda: llm, batch_size=2)
        assert cache.missing(CAPTIONS) == [] and cache.stats["encoded"] == len(CAPTIONS)
        states = cache.load(CAPTIONS).states(CAPTIONS)
        ref = encode(llm, CAPTIONS, template, 32)
        assert torch.equal(states.mask, ref.mask) and torch.equal(states.prompt, ref.prompt)
        torch.testing.assert_close(states.hidden, ref.hidden, atol=2e-3, rtol=2e-3)  # stored as float16
        other = FeatureCache(tmp_path, folder, -3, PromptTemplate(instruction=""), 32)
        assert other.dir != cache.dir and len(other.missing(CAPTIONS)) == len(CAPTIONS)


def test_second_epoch_and_second_run_never_call_the_llms(tiny_llm_dirs, tmp_path, monkeypatch):
    calls = {"load": 0, "forward": 0}

    def counting_load(*args, **kw):
        calls["load"] += 1
        llm = load_llm(*args, **kw)
        llm.model.register_forward_pre_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1))
        return llm

    monkeypatch.setattr(inputs, "load_llm", counting_load)
    # 6 steps x 4 images = 3 epochs of the 8-caption pool
    result = quiet_train(config(tiny_llm_dirs, tmp_path, steps=6, llm_batch_size=64))
    unique = len(set(SceneStream.from_config(8, 16, 0).captions) | {""})
    assert calls == {"load": 2, "forward": 2 * 2}  # per LLM: the template prefix once, then one batch of captions
    assert [f["encoded"] for f in result["features"]] == [unique, unique]
    calls.update(load=0, forward=0)
    result = quiet_train(config(tiny_llm_dirs, tmp_path, steps=6, output_dir=str(tmp_path / "again")))
    assert calls == {"load": 0, "forward": 0} and [f["encoded"] for f in result["features"]] == [0, 0]


def test_caption_dropout_feeds_the_template_wrapped_empty_prompt(tiny_llm_dirs, tiny_llms, tmp_path, monkeypatch):
    seen = []

    def spy(model, cfg, x0, texts, generator=None, **kwargs):
        seen.append(texts)
        return real(model, cfg, x0, texts, generator, **kwargs)

    real = loop.training_loss
    monkeypatch.setattr(loop, "training_loss", spy)
    quiet_train(config(tiny_llm_dirs, tmp_path, steps=1, caption_dropout=1.0))
    template = PromptTemplate.of(model_config("tiny").text)
    for states, llm in zip(seen[0], tiny_llms):
        ref = encode(llm, [""], template, 32)
        n = int(ref.mask[0].sum())
        assert n > 0 and not states.prompt.any()  # scaffolding only: the template is there, the prompt is empty
        assert (states.mask.sum(1) == n).all()
        torch.testing.assert_close(states.hidden[:, :n], ref.hidden[:, :n].expand(len(states.hidden), -1, -1),
                                   atol=2e-3, rtol=2e-3)


def test_checkpoint_carries_the_statistics_of_the_caption_features(tiny_llm_dirs, tiny_llms, tmp_path):
    """The trainer fills every branch's FeatureNorm from the cached features of its caption pool."""
    quiet_train(config(tiny_llm_dirs, tmp_path, steps=1))
    model = load_checkpoint(tmp_path / "run/model.safetensors")
    template = PromptTemplate.of(model_config("tiny").text)
    captions = list(dict.fromkeys([""] + SceneStream.from_config(8, 16, 0).captions))
    for refiner, llm in zip(model.text.refiners, tiny_llms, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            states = encode(llm, captions, template, 32)
        prefix = len(template_ids(llm.tokenizer, template)[0])
        tokens = torch.cat([states.hidden[i, prefix:int(states.mask[i].sum())] for i in range(len(captions))])
        torch.testing.assert_close(refiner.feature_norm.mean, tokens.mean(0), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(refiner.feature_norm.std, tokens.std(0, correction=0), atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------
def test_resume_continues_exactly(tiny_llm_dirs, tmp_path):
    """The split run saves asynchronously (also at step 2, written while step 3 trains): same bits."""
    kw = dict(steps=6, grad_accum=2, lr_schedule="cosine", warmup_steps=2, caption_dropout=0.3)
    whole = config(tiny_llm_dirs, tmp_path, output_dir=str(tmp_path / "whole"), **kw)
    split = config(tiny_llm_dirs, tmp_path, output_dir=str(tmp_path / "split"), async_checkpoint=True,
                   checkpoint_every=2, **kw)
    quiet_train(whole)
    first = quiet_train(split, stop_after=3)
    assert first["step"] == 3 and json.loads((tmp_path / "split/resume/state.json").read_text())["step"] == 3
    quiet_train(split, resume=tmp_path / "split/resume")
    a, b = tmp_path / "whole", tmp_path / "split"
    sa, sb = read_resume_tensors(a / "resume"), read_resume_tensors(b / "resume")
    assert sa.keys() == sb.keys() and any(k.startswith("optim.") for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "raw weights, EMA or optimizer state differ"
    assert (a / "resume/rng-rank0.json").read_text() == (b / "resume/rng-rank0.json").read_text()
    ma, mb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    def losses(p):
        return [json.loads(line)["loss"] for line in (p / "log.jsonl").read_text().splitlines()]
    assert losses(a) == losses(b) and len(losses(a)) == 6
    # The EMA checkpoint is a lidit checkpoint, with the training command and stats in its metadata.
    model = load_checkpoint(a / "model.safetensors")
    assert not any(torch.equal(model.state_dict()[k], sa[f"model.{k}"]) for k in ["dit.final.linear.weight"])
    meta = read_metadata(a / "model.safetensors")
    assert meta["training_command"].startswith("python -m lidit train")
    assert json.loads(meta["training_stats"])["step"] == 6 and json.loads(meta["training_config"])["steps"] == 6


def test_lr_schedule_and_config_overrides(tmp_path):
    cfg = TrainConfig.from_dict({"lr": 1.0, "steps": 10, "warmup_steps": 2, "lr_schedule": "cosine", "lr_final": 0.0})
    assert [round(lr_at(cfg, s), 3) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.0]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": "demo", "data": "scenes", "steps": 5}))
    raw = load_config(str(path), ["steps=7", "model.overrides.dit.depth=2", "data.pool_size=10", "lr=3e-4"])
    cfg = TrainConfig.from_dict(raw)
    assert cfg.steps == 7 and cfg.data.pool_size == 10 and cfg.lr == 3e-4
    assert model_config(cfg.model).dit.depth == 2 and model_config(cfg.model).dit.hidden == 128
    assert model_config({"preset": "tiny", "overrides": {"text": {"refiner_depth": 0}}}, 32).resolution == 32
    with pytest.raises(ValueError, match="unknown training config"):
        TrainConfig.from_dict({"step": 3})
    with pytest.raises(ValueError, match="no field"):
        model_config({"preset": "tiny", "overrides": {"dit.width": 3}})


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------
def write_folder(root: Path) -> None:
    root.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(40, 40), (36, 36), (60, 40), (64, 40), (40, 60), (30, 45), (80, 44)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture number {i}\n")
    Image.new("RGB", (20, 20)).save(root / "uncaptioned.png")


def test_image_folder_buckets(tmp_path):
    write_folder(tmp_path / "imgs")
    buckets = make_buckets(32, 4)
    assert (32, 32) in buckets and all(w % 4 == 0 and h % 4 == 0 for w, h in buckets)
    assert buckets[nearest_bucket(60, 40, buckets)] == (40, 28)  # 3:2
    with pytest.warns(UserWarning, match="without a same-named .txt"):
        data = FolderData(tmp_path / "imgs", 32, 4)
    assert len(data.items) == 7 and data.captions[0] == "picture number 0"
    stream = BucketStream(data, micro_batch=2, seed=0)
    seen = set()
    for _ in range(len(stream.epoch_batches(0))):
        x, caps = stream.next_batch()
        assert x.shape[0] == 2 and x.min() >= -1 and x.max() <= 1
        assert (x.shape[3], x.shape[2]) in buckets  # one bucket per batch
        seen.update(caps)
    assert seen == set(data.captions)  # every image in one epoch
    state = stream.state_dict()
    after = [stream.next_batch()[1] for _ in range(3)]
    again = BucketStream(data, micro_batch=2, seed=0)
    again.load_state_dict(state)
    assert [again.next_batch()[1] for _ in range(3)] == after


def test_training_from_an_image_folder(tiny_llm_dirs, tmp_path):
    write_folder(tmp_path / "imgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = quiet_train(config(tiny_llm_dirs, tmp_path, steps=2, data=f"folder:{tmp_path / 'imgs'}",
                                    model={"preset": "tiny", "overrides": {"resolution": 32}}))
    assert result["step"] == 2 and load_checkpoint(tmp_path / "run/model.safetensors").config.resolution == 32


class StubVAE:
    """What the trainer uses of a diffusers AutoencoderKL: encode().latent_dist and config."""

    class config:
        latent_channels, scaling_factor, shift_factor = 16, 1.5305, 0.0609

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        pooled = torch.nn.functional.avg_pool2d(x, 8)
        mean = pooled.repeat(1, 6, 1, 1)[:, :16]

        class Dist:
            pass
        dist = Dist()
        dist.mean, dist.std = mean, torch.full_like(mean, 0.1)
        return type("Out", (), {"latent_dist": dist})()


def test_latent_folder_caches_latents(tmp_path):
    write_folder(tmp_path / "imgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = FolderData(tmp_path / "imgs", 64, 16)
        vae = StubVAE()
        data.cache_latents(vae, tmp_path / "latents", "stub")
        assert vae.calls > 0
        x = data.sample([0, 1], torch.Generator().manual_seed(0))
        w, h = data.buckets[data.items[0].bucket]
        assert x.shape == (2, 16, h // 8, w // 8)
        again = FolderData(tmp_path / "imgs", 64, 16)
        vae2 = StubVAE()
        again.cache_latents(vae2, tmp_path / "latents", "stub")
    assert vae2.calls == 0 and again.latent_scale == (1.5305, 0.0609)


def test_latent_models_need_a_vae(tiny_llm_dirs, tmp_path):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install diffusers"):
            load_vae(tmp_path)
    write_folder(tmp_path / "imgs")
    cfg = config(tiny_llm_dirs, tmp_path, data=f"folder:{tmp_path / 'imgs'}",
                 model={"preset": "tiny", "overrides": {"dit": {"in_channels": 16}, "latent_format": "sd3"}})
    with pytest.raises(ValueError, match="set data.vae"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_mod.train(cfg)
