"""The emoji data set: 3,781 emoji in two art styles (Noto Emoji, Twemoji), real English captions, and
the held-out splits of the emoji benchmark.

Why emoji: artist-drawn images small enough to train on a CPU, with a name per image that a frozen
LLM knows, and many other names (keywords, tags, other languages) to test the paper's claim on
phrasings the diffusion model never trained on.

Sources (npm packages, fetched and pinned by `scripts/provision_emoji.py`): the images and the
`emoji.json` index of `emoji-datasource-google` / `-twitter`; the labels and tags of `emojibase-data`;
the CLDR annotations (keywords and names in many languages); the OpenMoji annotations (evaluation
only). Everything here is plain Python over those packages' JSON: the catalogue is built the same
way from the same files, so the splits are reproducible without storing them anywhere.

- **Caption** of a training image: `"<emojibase label>, <style> style"`, e.g. `"turtle, twemoji
  style"` or `"waving hand: dark skin tone, noto emoji style"`. Only the label and the style words
  ever appear in a caption: tags, CLDR keywords, names in other languages and OpenMoji annotations
  are held out for the benchmark's set (b).
- **Held out** (never in the training folder; both chosen by a hash of the code point, so a subset
  built with `limit` holds out exactly what the full set holds out):
  - `tone`: for 20% of the people emoji (those with skin-tone variants), one of the five tones: every
    image of that person showing that tone, in both styles (set c1).
  - `style`: for 10% of the other concepts, every Twemoji image (the Noto one is trained; set c2).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: style key (the datasource package's) -> the words that name the style in a caption
STYLES: dict[str, str] = {"google": "noto emoji", "twitter": "twemoji"}
TONE_NAMES = ("light", "medium-light", "medium", "medium-dark", "dark")
TONE_CODES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")
TONE_HOLDOUT = 0.2   # share of people emoji with one tone held out
STYLE_HOLDOUT = 0.1  # share of the other concepts whose Twemoji images are held out
#: CLDR languages whose emoji names form the multilingual part of set (b)
NAME_LANGUAGES = ("fr", "de", "es")


@dataclass(frozen=True)
class Emoji:
    """One image id (a base emoji or one of its skin-tone variants), in every style that draws it."""

    key: str                  # the image's file stem in the packages, e.g. "1f44b-1f3fd"
    hexcode: str              # the unified code points, e.g. "1F44B-1F3FD"
    base: str                 # the key of its base emoji (itself for a base emoji)
    label: str                # emojibase label, unique per image
    tones: tuple[int, ...]    # skin tones 1..5 in the image, () for a base emoji
    category: str
    subcategory: str
    styles: tuple[str, ...]   # styles with an image of it
    heldout: dict[str, str] = field(default_factory=dict)  # style -> "tone" | "style"

    def caption(self, style: str) -> str:
        return caption(self.label, style)


def caption(label: str, style: str) -> str:
    """The training caption; the style is named in it, so a prompt can choose the style."""
    return f"{label}, {STYLES[style]} style"


def stable_fraction(*parts: str) -> float:
    """A stable number in [0, 1) per key: splits that do not depend on the order or size of the set."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _tones(variation: str) -> tuple[int, ...]:
    return tuple(TONE_CODES.index(code) + 1 for code in variation.split("-"))


def catalogue(datasource: list[dict], emojibase: list[dict]) -> list[Emoji]:
    """Every non-component image of `emoji.json` with its emojibase label and its held-out styles.

    `datasource` is the parsed `emoji.json` of emoji-datasource (either style's package: they list the
    same images with `has_img_<style>` flags); `emojibase` is emojibase-data's `en/data.json`.
    """
    labels: dict[str, dict] = {}
    for entry in emojibase:
        labels[entry["hexcode"]] = entry
        for skin in entry.get("skins") or ():
            labels[skin["hexcode"]] = skin

    def label(hexcode: str) -> str:
        found = labels.get(hexcode) or labels.get(hexcode.replace("-FE0F", ""))
        if found is None:
            raise ValueError(f"emoji {hexcode} has no emojibase label: the emojibase-data and emoji-datasource "
                             "versions do not match; use the pinned versions of scripts/provision_emoji.py")
        return found["label"]

    out: list[Emoji] = []
    people = [e for e in datasource if e["category"] != "Component" and e.get("skin_variations")]
    # c1: the people emoji with one tone held out (an exact 20%, ranked by hash), and that tone
    ranked = sorted(people, key=lambda e: stable_fraction("tone", e["unified"]))
    tone_held = {e["unified"]: 1 + int(stable_fraction("which-tone", e["unified"]) * 5)
                 for e in ranked[:round(TONE_HOLDOUT * len(people))]}
    others = [e for e in datasource if e["category"] != "Component" and e["unified"] not in tone_held]
    ranked = sorted(others, key=lambda e: stable_fraction("style", e["unified"]))
    style_held = {e["unified"] for e in ranked[:round(STYLE_HOLDOUT * len(others))]}
    for entry in sorted(datasource, key=lambda e: e["sort_order"]):
        if entry["category"] == "Component":
            continue
        base = Path(entry["image"]).stem
        variants = [(entry, ())] + [(v, _tones(k)) for k, v in (entry.get("skin_variations") or {}).items()]
        for image, tones in variants:
            styles = tuple(s for s in STYLES if image.get(f"has_img_{s}"))
            held: dict[str, str] = {}
            if tone_held.get(entry["unified"]) in tones:
                held = {s: "tone" for s in styles}
            elif entry["unified"] in style_held and "twitter" in styles:
                held = {"twitter": "style"}
            out.append(Emoji(Path(image["image"]).stem, image["unified"], base, label(image["unified"]), tones,
                             entry["category"], entry["subcategory"], styles, held))
    if len({e.label for e in out}) != len(out):
        raise ValueError("emojibase labels are not unique across the images: a caption would name two images")
    return out


# ------------------------------------------------------------------------------------------------
# set (b): phrasings never trained on
# ------------------------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+(?:['’-]\w+)*", text.lower()))


@dataclass(frozen=True)
class Phrasing:
    text: str     # the phrase, e.g. "tortoise"
    key: str      # the base emoji it names
    source: str   # "tag" (emojibase), "cldr-keyword", "openmoji-tag", "name-fr", ...


def phrasings(emojis: list[Emoji], emojibase: list[dict], cldr: Mapping[str, Mapping[str, dict]],
              openmoji: Iterable[dict] = ()) -> list[Phrasing]:
    """Phrases that name exactly one base emoji and occur in no training caption: set (b).

    Sources: emojibase tags, CLDR English keywords, OpenMoji tags (English), and CLDR names in
    NAME_LANGUAGES. A phrase is kept only when (1) after lower-casing it is not a word sequence of
    any label (so it was never trained on, even inside another caption), (2) no other base emoji has
    it in any source (so it has one right answer), and (3) its emoji is trained in both styles
    (so only the phrasing is new). `cldr` maps a language to CLDR's annotations by emoji character.
    """
    bases = {e.key: e for e in emojis if e.base == e.key}
    trained = {k for k, e in bases.items() if not e.heldout and len(e.styles) == len(STYLES)}
    seen = [f" {_norm(e.label)} " for e in emojis]
    by_hex = {e.hexcode: e.key for e in bases.values()}
    by_hex |= {h.replace("-FE0F", ""): k for h, k in list(by_hex.items())}
    candidates: dict[tuple[str, str], set[str]] = {}  # (source, phrase) -> base keys

    def add(source: str, hexcode: str, words: Iterable[str]) -> None:
        key = by_hex.get(hexcode) or by_hex.get(hexcode.replace("-FE0F", ""))
        if key is None:
            return
        for word in words:
            phrase = _norm(word)
            if len(phrase) >= 3 and not phrase.isdigit():
                candidates.setdefault((source, phrase), set()).add(key)

    chars = {}
    for entry in emojibase:
        add("tag", entry["hexcode"], entry.get("tags") or ())
        chars[entry["emoji"].replace("\ufe0f", "")] = entry["hexcode"]
    for language, table in cldr.items():
        for char, notes in table.items():
            hexcode = chars.get(char.replace("\ufe0f", ""))
            if hexcode is None:
                continue
            if language == "en":
                add("cldr-keyword", hexcode, notes.get("default") or ())
            else:
                add(f"name-{language}", hexcode, notes.get("tts") or ())
    for row in openmoji:
        if not row.get("skintone"):
            add("openmoji-tag", row["hexcode"], (t for t in (row.get("openmoji_tags") or "").split(",") if t.strip()))
    # a phrase naming two emoji in any source is ambiguous in all of them
    owners: dict[str, set[str]] = {}
    for (_, phrase), keys in candidates.items():
        owners.setdefault(phrase, set()).update(keys)
    out = []
    for (source, phrase), keys in sorted(candidates.items()):
        (key,) = keys if len(owners[phrase]) == 1 else (None,)
        if key is None or key not in trained or any(f" {phrase} " in s for s in seen):
            continue
        out.append(Phrasing(phrase, key, source))
    return out


# ------------------------------------------------------------------------------------------------
# images and the folders a run reads
# ------------------------------------------------------------------------------------------------
def on_white(png: bytes):
    """An emoji PNG (RGBA, LA or palette with transparency) as RGB on white: what the model draws."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def write_dataset(out: str | Path, emojis: list[Emoji], images: Mapping[tuple[str, str], bytes],
                  extra: Mapping[str, object] | None = None) -> dict:
    """Write the image folder a user converts and trains on, the real images the scorer indexes,
    and the catalogue:

    - `train/<key>.<style>.png` + `.txt`: every image not held out, with its caption (for
      `python -m lidit convert shards`);
    - `real/<style>/<key>.png`: every image, held out or not, RGB on white;
    - `catalog.json`: the emoji (label, tones, held-out styles) and `extra` (e.g. set (b)).
    """
    out = Path(out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "real": 0, "heldout": {}}
    for e in emojis:
        for style in e.styles:
            png = images.get((style, e.key))
            if png is None:
                raise FileNotFoundError(f"no {style} image {e.key}.png was extracted; re-run scripts/provision_emoji.py")
            image = on_white(png)
            real = out / "real" / style / f"{e.key}.png"
            real.parent.mkdir(parents=True, exist_ok=True)
            image.save(real)
            counts["real"] += 1
            reason = e.heldout.get(style)
            if reason:
                counts["heldout"][reason] = counts["heldout"].get(reason, 0) + 1
                continue
            image.save(out / "train" / f"{e.key}.{style}.png")
            (out / "train" / f"{e.key}.{style}.txt").write_text(e.caption(style) + "\n", encoding="utf-8")
            counts["train"] += 1
    catalog = {"format": "lidit-emoji-v1", "styles": STYLES, "counts": counts,
               "emoji": [asdict(e) for e in emojis], **(extra or {})}
    (out / "catalog.json").write_text(json.dumps(catalog, ensure_ascii=False))
    return catalog


def load_catalog(root: str | Path) -> tuple[list[Emoji], dict]:
    """The emoji of a provisioned folder and the whole catalogue (for its set (b) phrasings)."""
    path = Path(root) / "catalog.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: provision the emoji with `python scripts/provision_emoji.py "
                                f"--out {root}`")
    catalog = json.loads(path.read_text(encoding="utf-8"))
    emojis = [Emoji(**{**e, "tones": tuple(e["tones"]), "styles": tuple(e["styles"])}) for e in catalog["emoji"]]
    return emojis, catalog


def read_openmoji_csv(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
