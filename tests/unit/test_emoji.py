"""The emoji data set: the catalogue, its captions and held-out splits, set (b)'s phrasings, the
provisioning from the real npm packages, conversion to shards, a few training steps, and the scorer.

The real packages are fetched with `npm pack` into the repository's `.cache/emoji/npm` (as
`scripts/provision.sh` does, so CI downloads them once). If they cannot be fetched, the test that
needs them fails and says why: it never skips.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import lidit.train as train_mod
from lidit.checkpoint import load_checkpoint, read_metadata
from lidit.cli import main as lidit_main
from lidit.data import emoji as E
from lidit.data.emoji import stable_fraction
from lidit.data.shards import ShardSet
from lidit.study.emoji_scorer import Scorer, accuracy, canonical
from lidit.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/provision_emoji.py"
TINY = 12  # base emoji in the CI-sized set (with their skin tones: a few dozen images per style)


def provisioner():
    spec = importlib.util.spec_from_file_location("provision_emoji", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# the catalogue on a hand-made emoji.json / emojibase pair
# ------------------------------------------------------------------------------------------------
def fake_sources(people: int = 10, things: int = 30):
    datasource, emojibase = [], []
    order = 0
    for i in range(people):
        hexcode = f"1F{i:03X}"
        skins = {t: {"unified": f"{hexcode}-{t}", "image": f"{hexcode.lower()}-{t.lower()}.png",
                     "has_img_google": True, "has_img_twitter": True} for t in E.TONE_CODES}
        datasource.append({"unified": hexcode, "image": f"{hexcode.lower()}.png", "category": "People & Body",
                           "subcategory": "person", "sort_order": order, "skin_variations": skins,
                           "has_img_google": True, "has_img_twitter": True})
        emojibase.append({"hexcode": hexcode, "label": f"person {i}", "emoji": chr(0x1F000 + i), "tags": [f"tag{i}"],
                          "skins": [{"hexcode": f"{hexcode}-{t}", "label": f"person {i}: {name} skin tone"}
                                    for t, name in zip(E.TONE_CODES, E.TONE_NAMES)]})
        order += 1
    for i in range(things):
        hexcode = f"2{i:03X}-FE0F"  # emojibase lists it without FE0F: the join retries
        datasource.append({"unified": hexcode, "image": f"{hexcode.lower()}.png", "category": "Objects",
                           "subcategory": "thing", "sort_order": order, "has_img_google": True,
                           "has_img_twitter": i != 0})
        emojibase.append({"hexcode": hexcode.replace("-FE0F", ""), "label": f"thing {i}", "emoji": chr(0x2000 + i),
                          "tags": ["shared", f"only{i}"] + (["thing 3"] if i == 4 else [])})
        order += 1
    datasource.append({"unified": "1F3FB", "image": "1f3fb.png", "category": "Component", "subcategory": "skin-tone",
                       "sort_order": order, "has_img_google": True, "has_img_twitter": True})
    return datasource, emojibase


def test_catalogue_captions_and_held_out_splits():
    datasource, emojibase = fake_sources()
    emojis = E.catalogue(datasource, emojibase)
    assert len(emojis) == 10 * 6 + 30  # the Component entry is skipped
    by_key = {e.key: e for e in emojis}
    assert by_key["2003-fe0f"].label == "thing 3"  # joined without -FE0F
    assert by_key["2000-fe0f"].styles == ("google",)
    assert by_key["1f000-1f3fd"].tones == (3,) and by_key["1f000-1f3fd"].base == "1f000"
    assert E.caption("turtle", "twitter") == "turtle, twemoji style"
    assert by_key["2001-fe0f"].caption("google") == "thing 1, noto emoji style"
    # c1: exactly 20% of the people lose one tone, in both styles, and keep the other four and the base
    held_tone = [e for e in emojis if "tone" in e.heldout.values()]
    assert len({e.base for e in held_tone}) == 2 and len(held_tone) == 2
    for e in held_tone:
        assert e.heldout == {"google": "tone", "twitter": "tone"} and len(e.tones) == 1
        assert not by_key[e.base].heldout
    # c2: 10% of the other concepts (8 people + 30 things) lose their Twemoji images only
    held_style = {e.base for e in emojis if e.heldout.get("twitter") == "style"}
    assert len(held_style) == round(0.1 * 38) and not held_style & {e.base for e in held_tone}
    assert all(e.heldout == {"twitter": "style"} for e in emojis if e.base in held_style and "twitter" in e.styles)
    # stable: the same splits whatever the order of the input
    again = E.catalogue(list(reversed(datasource)), emojibase)
    assert {e.key: e.heldout for e in again} == {e.key: e.heldout for e in emojis}


def test_a_missing_label_names_the_version_mismatch():
    datasource, emojibase = fake_sources()
    with pytest.raises(ValueError, match="versions do not match"):
        E.catalogue(datasource, emojibase[1:])


def test_set_b_phrasings_are_in_no_caption_and_name_one_trained_emoji():
    datasource, emojibase = fake_sources()
    emojis = E.catalogue(datasource, emojibase)
    cldr = {"en": {chr(0x2000 + 5): {"default": ["gizmo", "shared"], "tts": ["thing 5"]}},
            "fr": {chr(0x2000 + 6): {"tts": ["chose six"]}}}
    found = E.phrasings(emojis, emojibase, cldr, [{"hexcode": "2007", "openmoji_tags": "doohickey, thing", "skintone": ""}])
    texts = {p.text: p for p in found}
    # trained: the base image is in the training folder in both styles
    trained = {e.key for e in emojis if e.key == e.base and not e.heldout and len(e.styles) == 2}
    expected = {f"only{i}" for i in range(30) if f"{0x2000 + i:04x}-fe0f" in trained}
    expected |= {f"tag{i}" for i in range(10) if f"1f{i:03x}" in trained}
    assert "only0" not in texts and "2000-fe0f" not in trained  # no Twemoji image: not trained in both styles
    assert "shared" not in texts  # names 30 emoji
    assert "thing 3" not in texts  # a tag that is a label: trained
    assert "thing" not in texts  # a word sequence of labels: trained
    for phrase, source, key in (("gizmo", "cldr-keyword", "2005-fe0f"), ("chose six", "name-fr", "2006-fe0f"),
                                ("doohickey", "openmoji-tag", "2007-fe0f")):
        if key in trained:
            assert texts.pop(phrase) == E.Phrasing(phrase, key, source)
    assert set(texts) == expected and all(p.source == "tag" for p in texts.values())
    assert all(p.key in trained for p in found)
    assert {e.base for e in emojis if e.heldout.get("twitter") == "style"} - trained  # c2 concepts were refused


def test_on_white_flattens_palette_and_grey_alpha_images():
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0  # index 0 transparent: red must not show
    grey = Image.new("LA", (4, 4), (0, 0))
    grey.putpixel((1, 1), (0, 255))
    for image, inked, colour in ((palette, (0, 0), (0, 0, 255)), (grey, (1, 1), (0, 0, 0))):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out = np.asarray(E.on_white(buf.getvalue()))
        assert out.shape == (4, 4, 3) and tuple(out[inked[1], inked[0]]) == colour
        assert (out.reshape(-1, 3) == 255).all(axis=1).sum() == 15  # everything else white


# ------------------------------------------------------------------------------------------------
# the provisioner's failures: no network, other bytes
# ------------------------------------------------------------------------------------------------
def fake_npm(tmp_path: Path, body: str) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + body)
    npm.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def run_provision(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_an_unreachable_registry_fails_loudly(tmp_path):
    env = fake_npm(tmp_path, "echo 'npm error code ENOTFOUND' >&2; exit 1\n")
    run = run_provision("--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), env=env)
    assert run.returncode == 2
    assert "npm pack emoji-datasource-google@16.0.0` failed" in run.stderr and "ENOTFOUND" in run.stderr
    assert not (tmp_path / "out").exists()


def test_a_tarball_that_differs_from_its_pin_is_refused_and_removed(tmp_path):
    # a "registry" that serves other bytes under the pinned name
    env = fake_npm(tmp_path, 'while [ "$1" != "--pack-destination" ]; do shift; done\n'
                             'echo tampered > "$2/emoji-datasource-google-16.0.0.tgz"\n')
    run = run_provision("--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), env=env)
    assert run.returncode == 2 and "pinned fb5fd131" in run.stderr
    assert not (tmp_path / "cache/emoji-datasource-google-16.0.0.tgz").exists()


# ------------------------------------------------------------------------------------------------
# the real packages at tiny size: provision, convert, train; the scorer on the real images
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_emoji(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emoji") / "emoji"
    run = run_provision("--limit", str(TINY), "--out", str(out), "--cache", str(ROOT / ".cache/emoji/npm"))
    assert run.returncode == 0, ("provisioning the emoji from the npm registry failed; this test needs the real "
                                 f"packages and does not skip:\n{run.stdout}\n{run.stderr}")
    return out


def test_provisioned_folder_holds_captions_and_no_held_out_image(tiny_emoji):
    emojis, catalog = E.load_catalog(tiny_emoji)
    assert len({e.base for e in emojis}) == TINY and set(catalog["packages"]) == set(provisioner().PACKAGES)
    assert any(e.tones for e in emojis), "the tiny set should reach the skin-tone emoji"
    pairs = {(e.key, s): e for e in emojis for s in e.styles}
    train = sorted((tiny_emoji / "train").glob("*.png"))
    assert len(train) == catalog["counts"]["train"] == sum(1 for (k, s), e in pairs.items() if s not in e.heldout)
    for png in train:
        key, style = png.stem.rsplit(".", 1)
        assert style not in pairs[key, style].heldout
        assert png.with_suffix(".txt").read_text().strip() == pairs[key, style].caption(style)
        with Image.open(png) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
    assert len(list((tiny_emoji / "real").rglob("*.png"))) == len(pairs)
    captions = " | ".join(p.read_text() for p in (tiny_emoji / "train").glob("*.txt")).lower()
    assert catalog["phrasings"] and all(f"{p['text']}, " not in captions for p in catalog["phrasings"])
    # idempotent: a second run leaves the folder as it is
    run = run_provision("--limit", str(TINY), "--out", str(tiny_emoji), "--cache", str(ROOT / ".cache/emoji/npm"))
    assert run.returncode == 0 and "up to date" in run.stdout


def test_tiny_emoji_convert_shards_and_train(tiny_emoji, tiny_llm_dirs, tmp_path):
    shards = tmp_path / "shards"
    lidit_main(["convert", "shards", str(tiny_emoji / "train"), str(shards), "--resolution", "16", "--step", "4",
                "--shard-size", "32"])
    index = ShardSet(shards)
    assert sum(s["items"] for s in index.index["shards"]) == len(list((tiny_emoji / "train").glob("*.png")))
    assert {it.caption for it in index.items(0)} <= {p.read_text().strip() for p in (tiny_emoji / "train").glob("*.txt")}
    cfg = TrainConfig.from_dict({
        "model": {"preset": "tiny", "overrides": {"resolution": 16}}, "llms": tiny_llm_dirs,
        "data": {"source": f"shards:{shards}"}, "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"),
        "steps": 3, "batch_size": 4, "log_every": 1, "checkpoint_every": 100, "device": "cpu", "progress": "none",
        "mixed_precision": "no"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captions truncated at the tiny preset's max_tokens
        train_mod.train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run/log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3]
    assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line)
    model = tmp_path / "run/model.safetensors"
    assert load_checkpoint(model).config.resolution == 16
    assert f"shards:{shards}" in read_metadata(model)["training_config"]


def test_scorer_finds_real_images_and_tells_apart_styles_it_never_indexed(tiny_emoji):
    emojis, _ = E.load_catalog(tiny_emoji)
    both = [e.key for e in emojis if len(e.styles) == 2]
    scorer = Scorer.from_folder(tiny_emoji, keys=both)
    real = [np.asarray(Image.open(tiny_emoji / "real/twitter" / f"{k}.png")) for k in both]
    assert accuracy(scorer.rank(real), both).top1.value == 1.0  # an indexed image finds itself
    # what a model at 16 px draws: the image at a quarter of its size, blurred back up
    small = [np.asarray(Image.fromarray(im).resize((16, 16), Image.Resampling.BOX).resize((64, 64))) for im in real]
    result = accuracy(scorer.rank(small), both)
    assert result.top1.value >= 0.8 and result.n == len(both) and result.top1.lo < result.top1.value
    # cross-style on the tiny set (its projection fitted on these very pairs): far better than chance
    google_only = Scorer.from_folder(tiny_emoji, styles=("google",), keys=both)
    cross = accuracy(google_only.rank(real), both)
    assert cross.top1.value > 5 / len(both)


def test_canonical_frame_ignores_margins_and_position():
    image = np.full((64, 64, 3), 255, np.uint8)
    image[10:30, 20:50] = (200, 30, 30)
    image[15:20, 25:30] = (0, 0, 0)
    moved = np.full((64, 64, 3), 255, np.uint8)
    moved[30:50, 2:32] = image[10:30, 20:50]
    torch.testing.assert_close(torch.from_numpy(canonical(image)), torch.from_numpy(canonical(moved)))
    blank = canonical(np.full((8, 8, 3), 255, np.uint8))
    assert blank.shape == (24, 24, 3) and np.allclose(blank, 1.0)


def test_ceiling_command_fits_on_one_half_and_queries_the_other(tiny_emoji, tmp_path):
    out = tmp_path / "ceiling.json"
    result = lidit_main(["eval", "emoji", "ceiling", "--data", str(tiny_emoji), "--openmoji", "", "--out", str(out)])
    emojis, _ = E.load_catalog(tiny_emoji)
    fit, query = result["halves"]["fit"], result["halves"]["query"]
    assert fit and query and fit + query == len(emojis)
    n = sum(1 for e in emojis if len(e.styles) == 2 and stable_fraction("scorer-half", e.base) >= 0.5)
    for name in ("google->twitter", "twitter->google"):
        figure = result[name]["exact"]
        assert figure["n"] == n and 0 <= figure["top1"]["lo"] <= figure["top1"]["value"] <= figure["top5"]["value"]
        assert result[name]["base_emoji"]["top1"]["value"] >= figure["top1"]["value"]
    assert "openmoji->both" not in result and json.loads(out.read_text()) == result


def test_grid_command_draws_a_row_per_concept_from_its_label_and_an_unseen_phrasing(tiny_emoji, tiny_llm_dirs, tmp_path,
                                                                                    monkeypatch):
    """The README picture's command, on a tiny random checkpoint: one row per concept (real, label,
    phrasing); a phrasing that a caption holds is refused."""
    from PIL import Image

    from lidit.checkpoint import save_checkpoint
    from lidit.config import preset
    from lidit.model import LIDiTModel
    from lidit.study import emoji_bench

    emojis, catalog = E.load_catalog(tiny_emoji)
    label = {e.key: e.label for e in emojis}
    rows = [(p["key"], label[p["key"]], p["text"]) for p in catalog["phrasings"][:2]]
    monkeypatch.setattr(emoji_bench, "GRID", rows)
    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, LIDiTModel(preset("tiny")).init_weights())
    llms = list(tiny_llm_dirs.values())
    prompts = lidit_main(["eval", "emoji", "grid", "--checkpoint", str(ckpt), *(a for f in llms for a in ("--llm", f)),
                          "--data", str(tiny_emoji), "--out", str(tmp_path / "grid.png")])["prompts"]
    assert prompts == [E.caption(text, "twitter") for _, lbl, phrase in rows for text in (lbl, phrase)]
    assert Image.open(tmp_path / "grid.png").size == (3 * 96, 2 * (96 + 16))
    monkeypatch.setattr(emoji_bench, "GRID", [(rows[0][0], rows[0][1], rows[0][1])])  # the label itself: trained
    with pytest.raises(ValueError, match="not a trained label and a held-out phrasing"):
        emoji_bench.grid(ckpt, llms, tmp_path / "no.png", tiny_emoji)


# ------------------------------------------------------------------------------------------------
# the benchmark on generated images and the variant study's pieces
# ------------------------------------------------------------------------------------------------
def test_prompt_sets_are_trained_captions_unseen_phrasings_and_held_out_pairs(tiny_emoji):
    from lidit.study.emoji_study import prompt_sets

    emojis, catalog = E.load_catalog(tiny_emoji)
    sets = prompt_sets(tiny_emoji)
    trained = {p.read_text().strip() for p in (tiny_emoji / "train").glob("*.txt")}
    assert {q.prompt for q in sets["a"]} == trained and len(sets["a"]) == len(trained)
    assert all(not q.any_tone for name in ("a", "c1", "c2") for q in sets[name])
    held = {(e.key, s): why for e in emojis for s, why in e.heldout.items()}
    assert sets["c1"] and sets["c2"], "the tiny set should hold out a tone and a style"
    for name, why in (("c1", "tone"), ("c2", "style")):
        assert {(q.truth, q.style) for q in sets[name]} == {k for k, w in held.items() if w == why}
        assert all(q.prompt not in trained for q in sets[name])
    assert len(sets["b"]) == len(catalog["phrasings"]) and all(q.any_tone for q in sets["b"])
    assert all(q.prompt.split(",")[0] not in {t.split(",")[0] for t in trained} for q in sets["b"])
    assert {q.style for q in sets["b"]} == {"google", "twitter"}
    capped = prompt_sets(tiny_emoji, count=3, seed=5)
    assert all(len(v) == min(3, len(sets[k])) for k, v in capped.items()) and capped == prompt_sets(tiny_emoji, 3, 5)


def test_hits_score_the_asked_style_exactly_and_phrasings_in_any_tone(tiny_emoji):
    from lidit.study.emoji_study import Query, hits

    emojis, _ = E.load_catalog(tiny_emoji)
    base_of = {e.key: e.base for e in emojis}
    scorers = {s: Scorer.from_folder(tiny_emoji, styles=(s,)) for s in ("google", "twitter")}
    toned = next(e for e in emojis if e.tones and "twitter" in e.styles)
    plain = next(e for e in emojis if not e.tones and e.key != toned.base and "twitter" in e.styles)
    real = {k: np.asarray(Image.open(tiny_emoji / "real/twitter" / f"{k}.png")) for k in (toned.key, plain.key)}
    queries = [Query("", "twitter", toned.key, False), Query("", "twitter", toned.base, False),
               Query("", "twitter", toned.base, True), Query("", "twitter", toned.key, False)]
    top1, top5 = hits(scorers, base_of, queries, [real[toned.key], real[toned.key], real[toned.key], real[plain.key]])
    # the toned image is its own answer; asked for the base emoji it is wrong, unless any tone counts
    assert top1.tolist() == [1, 0, 1, 0] and top5[0] == top5[2] == 1 and top5[3] == 0


def test_bench_command_draws_and_scores_every_set(tiny_emoji, tiny_llm_dirs, tmp_path):
    from lidit.checkpoint import save_checkpoint
    from lidit.config import preset
    from lidit.model import LIDiTModel
    from lidit.study.emoji_study import SET_NAMES

    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, LIDiTModel(preset("tiny")).init_weights())
    llms = [a for f in tiny_llm_dirs.values() for a in ("--llm", f)]
    scores = lidit_main(["eval", "emoji", "bench", "--checkpoint", str(ckpt), *llms, "--data", str(tiny_emoji),
                         "--count", "4", "--out", str(tmp_path / "bench")])["tiny"]
    assert set(scores) == set(SET_NAMES)
    for s in scores.values():
        assert s["n"] == len(s["hits1"]) <= 4 and s["top1"]["value"] == np.mean(s["hits1"]) <= s["top5"]["value"]
    table = (tmp_path / "bench/table.md").read_text()
    assert all(name in table for name in SET_NAMES.values())


def test_control_llm_keeps_the_architecture_and_tokens_and_loses_the_weights(tiny_llm_dirs, tmp_path):
    from lidit.llm import load_llm
    from lidit.study.emoji_study import random_llm

    source = Path(tiny_llm_dirs["tiny-llama"])
    control = random_llm(source, tmp_path / "control", seed=1)  # the fixture's own init is seed 0's
    real, fresh = load_llm(str(source)), load_llm(str(control))
    shape = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    assert [getattr(fresh.model.config, k) for k in shape] == [getattr(real.model.config, k) for k in shape]
    text = "a turtle, twemoji style"
    assert fresh.tokenizer(text)["input_ids"] == real.tokenizer(text)["input_ids"]
    weights = dict(real.model.named_parameters())
    assert all(not torch.equal(p, weights[n]) for n, p in fresh.model.named_parameters() if p.dim() > 1)
    assert random_llm(source, tmp_path / "control") == control  # made once


def test_variants_train_from_one_config_and_differ_only_in_their_text_pathway(tmp_path):
    from lidit.study.emoji_study import BASE_CONFIG, train_command, variants
    from lidit.train.config import load_config

    plan = variants(Path("models/LLM"), tmp_path / "control")
    configs = {}
    for name, variant in plan.items():
        cmd = train_command(variant, tmp_path / "shards", tmp_path / name, 40, 0)
        configs[name] = TrainConfig.from_dict(load_config(str(BASE_CONFIG), cmd[cmd.index(str(BASE_CONFIG)) + 1:]))
    same = {k: v for k, v in configs["both"].to_dict().items() if k not in ("model", "llms", "output_dir")}
    for cfg in configs.values():
        assert cfg.steps == 40 and {k: cfg.to_dict()[k] for k in same} == same
    assert len(configs["both"].llms) == 2 and list(configs["control"].llms.values()) == [str(tmp_path / "control")]
    assert configs["smollm2"].model["overrides"]["text"]["branches"][0]["hidden_size"] == 576


def test_difference_table_calls_separation_only_when_the_interval_excludes_zero():
    from lidit.study.emoji_study import difference_table, differences

    def scored(hits5: list[int]) -> dict:
        return {"b": {"hits1": hits5, "hits5": hits5}}

    rows = differences({"both": scored([1] * 30), "same": scored([1, 0] * 15), "control": scored([1, 0] * 15)})
    by = {(r["variant"], r["figure"]): r for r in rows}
    assert by["both", "top-5"]["difference"]["lo"] > 0 and by["both", "top-5"]["ratio"] == 2
    assert by["same", "top-5"]["difference"]["value"] == 0
    table = difference_table(rows).splitlines()
    assert table[2].endswith("| yes |") and table[-1].endswith("| no |")


def test_a_runs_score_is_kept_while_its_model_and_settings_stay(tmp_path, monkeypatch):
    from lidit.study import emoji_study

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"one")
    calls = []
    monkeypatch.setattr(emoji_study, "score_checkpoint", lambda *a: calls.append(a) or {"a": len(calls)})
    assert emoji_study.scored(run, ["llm"], tmp_path, None, 0) == {"a": 1}
    assert emoji_study.scored(run, ["llm"], tmp_path, None, 0) == {"a": 1} and len(calls) == 1
    assert emoji_study.scored(run, ["llm"], tmp_path, 10, 0) == {"a": 2}  # other settings: scored again
    (run / "model.safetensors").write_bytes(b"two")
    assert emoji_study.scored(run, ["llm"], tmp_path, 10, 0) == {"a": 3}  # another model: scored again
