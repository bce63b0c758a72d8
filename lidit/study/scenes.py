"""Synthetic scene grammar for the demo: captions with exact, machine-checkable ground truth.

No captioned compositional data set is available offline, and the paper's claims (attribute binding,
position bias along the prompt) need ground truth per object. A scene is 1-4 coloured shapes on a
dark grey background (the long scenes of the positional-bias figure: up to 6, on a wider canvas);
object k of n sits in column k of n equal columns, in the order the caption names them. Because of
that, a rendered (or generated) image can be read back column by column and scored per object, per
prompt and per relative position in the prompt (the paper's Fig. 3).

Three things keep training and evaluation honest:

* Caption *templates* are split: the model trains on ``TRAIN_STYLES`` only; ``HELDOUT_STYLES`` are
  paraphrases it never sees (tests assert no held-out caption string equals a training one).
* Object *combinations* are split: a scene's ordered (colour, shape) sequence is hashed (sha256, so
  the split is stable across runs and machines) and a fixed ``EVAL_FRACTION`` of all sequences is
  reserved for evaluation. ``sample_scene(..., split="train")`` never yields one, so an evaluation
  prompt is never a training caption, whatever the template.
* Rendering jitter (size, position, colour) is small enough that ``read_scene`` recovers the ground
  truth essentially always (>= 99.5 % of objects is asserted in the tests), so checker errors do not
  masquerade as model errors.

Pure numpy + PIL; torch tensors are accepted by the scoring functions but torch is never imported.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 245),
    "yellow": (240, 230, 30),
    "magenta": (225, 40, 225),
    "cyan": (30, 220, 230),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (48, 48, 48)
MAX_OBJECTS = 4  # the default scenes (the demo's training data and the benchmark's main sets): 1..4 objects
# The long scenes of the positional-bias figure: up to 6 objects on a canvas LONG_CANVAS times the
# model's, so 6 columns are exactly as wide as 4 columns of the default canvas (16 px at 64 px).
LONG_MAX_OBJECTS = 6
LONG_CANVAS = LONG_MAX_OBJECTS / MAX_OBJECTS
EVAL_FRACTION = 0.2
_SPLIT_SALT = "lidit-scenes-v1"
POSITION_BUCKETS: tuple[str, ...] = ("0-25%", "25-50%", "50-75%", "75-100%")
# One image as numpy (uint8, or float in [0, 1]) or a torch tensor, HWC or CHW.
ImageLike = Any


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.colour not in COLOURS or self.shape not in SHAPES:
            raise ValueError(f"unknown object {self.colour!r} {self.shape!r}")

    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects from left to right; the caption names them in the same order."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= LONG_MAX_OBJECTS:
            raise ValueError(f"a scene has 1..{LONG_MAX_OBJECTS} objects, got {len(self.objects)}")

    @classmethod
    def of(cls, *pairs: tuple[str, str]) -> Scene:
        return cls(tuple(SceneObject(c, s) for c, s in pairs))

    @property
    def n(self) -> int:
        return len(self.objects)

    @property
    def key(self) -> str:
        """Canonical text of the ordered combination; what the train/eval split hashes."""
        return "|".join(f"{o.colour} {o.shape}" for o in self.objects)

    def pairs(self) -> list[tuple[str, str]]:
        return [(o.colour, o.shape) for o in self.objects]


# ------------------------------------------------------------------------------------------------
# train / eval split of combinations
# ------------------------------------------------------------------------------------------------
def is_eval_combo(scene: Scene, eval_fraction: float = EVAL_FRACTION) -> bool:
    """True if this ordered combination is reserved for evaluation.

    sha256 rather than ``hash()`` because the split must not change with PYTHONHASHSEED.
    """
    h = hashlib.sha256(f"{_SPLIT_SALT}:{scene.key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < eval_fraction


def sample_scene(
    rng: np.random.Generator,
    n_objects: int | None = None,
    split: str | None = "train",
    eval_fraction: float = EVAL_FRACTION,
) -> Scene:
    """Uniform over colours and shapes; ``split`` ("train", "eval" or None) filters combinations.

    With ``n_objects=None`` the count is uniform in 1..4.
    """
    if split not in ("train", "eval", None):
        raise ValueError(f"split must be 'train', 'eval' or None, got {split!r}")
    colours, shapes = list(COLOURS), list(SHAPES)
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    for _ in range(10_000):
        scene = Scene(tuple(
            SceneObject(colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])
            for _ in range(n)
        ))
        if split is None or is_eval_combo(scene, eval_fraction) == (split == "eval"):
            return scene
    raise RuntimeError(f"no {split} combination with {n} objects at eval_fraction={eval_fraction}")


# ------------------------------------------------------------------------------------------------
# captions
# ------------------------------------------------------------------------------------------------
def _and_list(p: Sequence[str]) -> str:
    return p[0] if len(p) == 1 else ", ".join(p[:-1]) + " and " + p[-1]


def _seq(p: Sequence[str], sep: str, single: str) -> str:
    return single.format(p[0]) if len(p) == 1 else sep.join(p)


def _ordinals(p: Sequence[str]) -> str:
    if len(p) == 1:
        return f"only {p[0]}"
    words = ["first", "second", "third", "fourth", "fifth"][: len(p) - 1] + ["last"]
    return ", ".join(f"{w} {x}" for w, x in zip(words, p))


def _finally(p: Sequence[str]) -> str:
    if len(p) == 1:
        return f"there is {p[0]}"
    return "there is " + ", ".join(p[:-1]) + " and finally " + p[-1]


# Every template is a function of the object phrases, left to right.
TRAIN_TEMPLATES: dict[str, Callable[[Sequence[str]], str]] = {
    "plain": _and_list,
    "image_of": lambda p: "an image of " + _and_list(p),
    "in_a_row": lambda p: _seq(p, ", ", "{} alone") if len(p) == 1 else _and_list(p) + " in a row",
    "followed_by": lambda p: _seq(p, " followed by ", "just {}"),
    "commas": lambda p: _seq(p, ", ", "one object: {}"),
    # Five more, none a held-out one (other connectives, numbering, a lead-in), for `data.styles: "all"`.
    # They did not help the demo: at its budget they cost 4-object accuracy and gained no paraphrase
    # accuracy (docs/training.md, "What was tried for a stronger demo").
    "semicolons": lambda p: _seq(p, "; ", "{} and nothing else"),
    "with": lambda p: _seq(p, ", ", "{} on its own") if len(p) == 1 else f"{p[0]} with " + _and_list(p[1:]),
    "picture": lambda p: "a picture showing " + _and_list(p),
    "numbered": lambda p: " ".join(f"{i}) {x}" for i, x in enumerate(p, 1)),
    "plus": lambda p: _seq(p, " plus ", "one shape: {}"),
}
HELDOUT_TEMPLATES: dict[str, Callable[[Sequence[str]], str]] = {
    "left_then": lambda p: f"in the middle {p[0]}" if len(p) == 1
    else f"to the left {p[0]}, then " + ", then ".join(p[1:]),
    "from_left": lambda p: "from left to right: " + _and_list(p),
    "next_to": lambda p: _seq(p, " next to ", "{} by itself"),
    "ordinals": _ordinals,
    "finally": _finally,
}
TRAIN_STYLES: tuple[str, ...] = tuple(TRAIN_TEMPLATES)
DEFAULT_TRAIN_STYLES: tuple[str, ...] = TRAIN_STYLES[:5]  # the demo's five (`data.styles: "default"`)
HELDOUT_STYLES: tuple[str, ...] = tuple(HELDOUT_TEMPLATES)


def training_styles(choice: str | Sequence[str]) -> tuple[str, ...]:
    """The training templates a config names: "default" (the demo's five), "all" or a list."""
    styles = {"all": TRAIN_STYLES, "default": DEFAULT_TRAIN_STYLES}.get(choice) if isinstance(choice, str) else tuple(choice)
    if not styles or any(s not in TRAIN_TEMPLATES for s in styles):
        raise ValueError(f"data.styles {choice!r}: use 'default', 'all' or a list of training templates "
                         f"from {list(TRAIN_STYLES)} (held-out templates cannot be trained on)")
    return styles


def caption(scene: Scene, style: str = "plain") -> str:
    """The caption of ``scene`` in one named template (training or held-out)."""
    template = TRAIN_TEMPLATES.get(style) or HELDOUT_TEMPLATES.get(style)
    if template is None:
        raise ValueError(f"unknown caption style {style!r}")
    return template([o.phrase() for o in scene.objects])


def sample_caption(scene: Scene, rng: np.random.Generator, styles: Sequence[str] = DEFAULT_TRAIN_STYLES) -> str:
    return caption(scene, styles[int(rng.integers(len(styles)))])


def all_captions(scene: Scene, styles: Iterable[str]) -> set[str]:
    return {caption(scene, s) for s in styles}


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Where and how big one object is drawn, in pixels of the output image."""

    cx: float
    cy: float
    extent: float  # bounding-box width (= height) of circle and triangle; square side is 0.85x
    rgb: tuple[int, int, int]


_SUPERSAMPLE = 4


def layout(scene: Scene, rng: np.random.Generator | None = None, size: int = 64) -> list[Placement]:
    """Place object k in column k; with ``rng``, jitter size, position and colour a little.

    Sizes are a fraction of the column (capped for 1-2 objects so shapes stay compact); the
    horizontal jitter keeps >= 1.5 px from the column edges so columns never share pixels.
    """
    n = scene.n
    col = size / n
    out = []
    for k, obj in enumerate(scene.objects):
        base = min(col, 0.55 * size)
        frac = 0.7 if rng is None else float(rng.uniform(0.6, 0.8))
        extent = base * frac
        slack_x = max(0.0, (col - extent) / 2 - 1.5 * size / 64)
        slack_y = 0.08 * size
        dx = dy = 0.0
        rgb = COLOURS[obj.colour]
        if rng is not None:
            dx = float(rng.uniform(-1, 1)) * min(slack_x, 2.0 * size / 64)
            dy = float(rng.uniform(-1, 1)) * slack_y
            rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in rgb)
        out.append(Placement((k + 0.5) * col + dx, size / 2 + dy, extent, rgb))
    return out


def _shape_mask(shape: str, p: Placement, size: int) -> tuple[int, int, np.ndarray]:
    """Anti-aliased coverage (0..1) of one shape as (top, left, crop): supersampled, box-averaged.

    Only the object's own box is drawn, which keeps rendering cheap enough for on-the-fly batches.
    """
    s, h = _SUPERSAMPLE, p.extent / 2
    x0, y0 = max(0, math.floor(p.cx - h) - 1), max(0, math.floor(p.cy - h) - 1)
    x1, y1 = min(size, math.ceil(p.cx + h) + 1), min(size, math.ceil(p.cy + h) + 1)
    img = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(img)
    cx, cy, h = (p.cx - x0) * s, (p.cy - y0) * s, h * s
    if shape == "circle":
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
    elif shape == "square":
        q = 0.85 * h
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=255)
    else:  # triangle, apex up
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=255)
    img = img.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    return y0, x0, np.asarray(img, dtype=np.float32) / 255.0


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = 64) -> np.ndarray:
    """uint8 HxWx3 image of ``scene``; ``rng=None`` gives the canonical (unjittered) drawing."""
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = BACKGROUND
    for obj, p in zip(scene.objects, layout(scene, rng, size)):
        y0, x0, a = _shape_mask(obj.shape, p, size)
        a = a[..., None]
        view = canvas[y0:y0 + a.shape[0], x0:x0 + a.shape[1]]
        view[:] = view * (1 - a) + np.asarray(p.rgb, np.float32) * a
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# checker
# ------------------------------------------------------------------------------------------------
def to_uint8(image: ImageLike) -> np.ndarray:
    """HxWx3 uint8 from uint8/float arrays (floats in [0, 1]), CHW or HWC, or a torch tensor."""
    if hasattr(image, "detach"):  # torch tensor, without importing torch
        image = image.detach().cpu().float().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"expected one image with 3 dims, got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr.astype(np.float32) * 255), 0, 255).astype(np.uint8)
    return arr


_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], np.float32)
_FG_THRESHOLD = 60.0  # max-channel distance from the background that counts as object
_MIN_PIXELS = 6


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected blob; stray specks in generated images must not spoil the features.

    Works on horizontal runs (one or two per row for these shapes) joined by union-find, which is
    much faster than a per-pixel flood fill in Python.
    """
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)
    ys, starts = np.nonzero(edges == 1)  # row-major order, so starts and stops pair up
    stops = np.nonzero(edges == -1)[1]
    runs = list(zip(ys.tolist(), starts.tolist(), stops.tolist()))
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev_lo = prev_hi = row_lo = 0  # index ranges of the runs in the previous / current row
    for i, (y, a, b) in enumerate(runs):
        if i == 0 or y != runs[i - 1][0]:
            prev_lo, prev_hi, row_lo = (row_lo, i, i) if i and runs[i - 1][0] == y - 1 else (i, i, i)
        for j in range(prev_lo, prev_hi):
            if runs[j][1] < b and a < runs[j][2]:
                parent[find(i)] = find(j)
    sizes: dict[int, int] = {}
    for i, (_, a, b) in enumerate(runs):
        r = find(i)
        sizes[r] = sizes.get(r, 0) + b - a
    out = np.zeros(mask.shape, dtype=bool)
    if sizes:
        best = max(sizes, key=sizes.__getitem__)
        for i, (y, a, b) in enumerate(runs):
            if find(i) == best:
                out[y, a:b] = True
    return out


@dataclass(frozen=True)
class ObjectReading:
    """What the checker saw in one column, with the features behind the shape decision."""

    colour: str
    shape: str
    fill: float  # area / (widest row x tallest column): square 1.0, circle 0.785, triangle 0.5
    bottom_heavy: float  # share of the area below the vertical middle: triangle 0.75, else 0.5
    pixels: int


def _classify_shape(fill: float, bottom_heavy: float) -> str:
    # Nearest prototype in (fill, bottom_heavy); bottom_heavy is scaled so both features weigh alike.
    protos = {"square": (1.0, 0.5), "circle": (0.785, 0.5), "triangle": (0.5, 0.75)}
    return min(protos, key=lambda s: (fill - protos[s][0]) ** 2 + (bottom_heavy - protos[s][1]) ** 2)


def read_object(region: np.ndarray, background: np.ndarray) -> ObjectReading | None:
    """Colour and shape of the main object in one column, or None if there is none."""
    px = region.astype(np.float32)
    dist = np.abs(px - background).max(axis=-1)
    mask = _largest_component(dist > _FG_THRESHOLD)
    n_px = int(mask.sum())
    if n_px < _MIN_PIXELS:
        return None
    # Colour from the confidently-inside pixels, so anti-aliased edges do not pull it to grey.
    d_in = dist[mask]
    core = px[mask][d_in >= 0.8 * np.percentile(d_in, 90)]
    rgb = np.median(core, axis=0)
    ci = int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))
    # Coverage per pixel by projecting onto the background->colour axis (exact for a clean render,
    # tolerant for generated images); restricted to the blob grown by one pixel for the soft edge.
    axis = rgb - background
    alpha = np.clip(((px - background) @ axis) / max(float(axis @ axis), 1e-6), 0, 1)
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    alpha = alpha * grown
    area = float(alpha.sum())
    width = float(alpha.sum(axis=1).max())
    height = float(alpha.sum(axis=0).max())
    fill = area / max(width * height, 1e-6)
    rows = alpha.sum(axis=1)
    ys = np.nonzero(rows > 0.5)[0]
    mid = (ys[0] + ys[-1]) / 2 if len(ys) else (len(rows) - 1) / 2
    y = np.arange(len(rows))
    below = float(rows[y > mid].sum() + 0.5 * rows[y == mid].sum())
    bottom = below / max(area, 1e-6)
    return ObjectReading(_PALETTE_NAMES[ci], _classify_shape(fill, bottom), fill, bottom, n_px)


def estimate_background(image: np.ndarray) -> np.ndarray:
    """Per-channel median: objects never cover half of the canvas, so the median is background."""
    return np.median(image.reshape(-1, 3).astype(np.float32), axis=0)


def read_scene_detailed(image: ImageLike, n_objects: int) -> list[ObjectReading | None]:
    img = to_uint8(image)
    bg = estimate_background(img)
    w = img.shape[1]
    edges = [round(k * w / n_objects) for k in range(n_objects + 1)]
    return [read_object(img[:, edges[k]:edges[k + 1]], bg) for k in range(n_objects)]


def read_scene(image: ImageLike, n_objects: int) -> list[tuple[str, str] | None]:
    """(colour, shape) per column, left to right; None where a column holds no object."""
    return [None if r is None else (r.colour, r.shape) for r in read_scene_detailed(image, n_objects)]


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------
def position_bucket(k: int, n: int) -> int:
    """Quarter of the prompt (0..3) holding object k (0-based) of n, at relative position (k+1)/n.

    This is the paper's Fig. 3 measure: how far into the prompt the attribute-noun pair ends.
    With it, object 1 of 1 and the last object of any prompt fall in the last quarter.
    """
    return min(3, math.ceil(4 * (k + 1) / n) - 1)


@dataclass
class SceneScore:
    """Per-object and per-prompt correctness plus the usual breakdowns (all accuracies in 0..1)."""

    object_correct: list[list[bool]]
    colour_correct: list[list[bool]]
    shape_correct: list[list[bool]]
    readings: list[list[tuple[str, str] | None]]
    n_objects: list[int] = field(default_factory=list)
    asked: list[list[tuple[str, str]]] = field(default_factory=list)

    def _mean(self, rows: list[list[bool]], keep: Callable[[int, int], bool] = lambda k, n: True) -> float:
        vals = [v for row, n in zip(rows, self.n_objects) for k, v in enumerate(row) if keep(k, n)]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def object_accuracy(self) -> float:
        return self._mean(self.object_correct)

    @property
    def colour_accuracy(self) -> float:
        return self._mean(self.colour_correct)

    @property
    def shape_accuracy(self) -> float:
        return self._mean(self.shape_correct)

    @property
    def prompt_correct(self) -> list[bool]:
        return [all(row) for row in self.object_correct]

    @property
    def prompt_accuracy(self) -> float:
        return float(np.mean(self.prompt_correct)) if self.prompt_correct else float("nan")

    def by_position(self, min_objects: int = 1) -> dict[str, float]:
        """Object accuracy per quarter of relative prompt position (prompts with >= min_objects)."""
        return {
            name: self._mean(self.object_correct, lambda k, n, b=b: n >= min_objects and position_bucket(k, n) == b)
            for b, name in enumerate(POSITION_BUCKETS)
        }

    def by_n(self) -> dict[int, float]:
        return {n: self._mean(self.object_correct, lambda k, m, n=n: m == n) for n in sorted(set(self.n_objects))}

    def by_slot(self) -> dict[tuple[int, int], float]:
        """Object accuracy for (n objects, 0-based index k): the unbucketed view."""
        slots = sorted({(n, k) for n in self.n_objects for k in range(n)})
        return {(n, k): self._mean(self.object_correct, lambda kk, m, n=n, k=k: m == n and kk == k) for n, k in slots}

    def first_vs_last(self) -> tuple[float, float]:
        """Accuracy of the first and of the last object over prompts with >= 2 objects."""
        return (self._mean(self.object_correct, lambda k, n: n >= 2 and k == 0),
                self._mean(self.object_correct, lambda k, n: n >= 2 and k == n - 1))

    def misread_shapes(self) -> dict[str, int]:
        """How often an asked shape was read as another ("square as circle"; "as none": no object):
        where a model's drawing, rather than its reading of the prompt, fails."""
        counts: dict[str, int] = {}
        for asked, read in zip(self.asked, self.readings):
            for (_, want), got in zip(asked, read):
                if got is None or got[1] != want:
                    key = f"{want} as {'none' if got is None else got[1]}"
                    counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict:
        first, last = self.first_vs_last()
        return {
            "images": len(self.object_correct),
            "object_accuracy": self.object_accuracy,
            "colour_accuracy": self.colour_accuracy,
            "shape_accuracy": self.shape_accuracy,
            "prompt_accuracy": self.prompt_accuracy,
            "by_position": self.by_position(),
            "by_position_multi": self.by_position(min_objects=2),
            "by_n": {str(k): v for k, v in self.by_n().items()},
            "first_object": first,
            "last_object": last,
            "misread_shapes": self.misread_shapes(),
        }


def score(images: Iterable[ImageLike], scenes: Sequence[Scene]) -> SceneScore:
    """Read every image with the checker and compare with its scene, object by object."""
    result = SceneScore([], [], [], [], [])
    images = list(images)
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    for image, scene in zip(images, scenes):
        got = read_scene(image, scene.n)
        want = scene.pairs()
        result.readings.append(got)
        result.asked.append(want)
        result.n_objects.append(scene.n)
        result.colour_correct.append([g is not None and g[0] == w[0] for g, w in zip(got, want)])
        result.shape_correct.append([g is not None and g[1] == w[1] for g, w in zip(got, want)])
        result.object_correct.append([g == w for g, w in zip(got, want)])
    return result


# ------------------------------------------------------------------------------------------------
# data sets
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    scene: Scene
    prompt: str
    style: str


def eval_set(
    seed: int,
    count: int,
    styles: Sequence[str] = ("plain",),
    n_objects: int | Sequence[int] | None = None,
    eval_fraction: float = EVAL_FRACTION,
) -> list[Example]:
    """A reproducible evaluation prompt set whose combinations never occur in training.

    Object counts cycle through ``n_objects`` (default 1..4) so every count and every position bucket
    is equally represented; styles cycle too. Pass ``styles=HELDOUT_STYLES`` to also test
    paraphrase generalisation. Repeats are possible for n=1 (only a few single objects are held
    out); for n >= 2 the held-out pool is large.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5CE7E]))
    counts = list(range(1, MAX_OBJECTS + 1)) if n_objects is None else (
        [n_objects] if isinstance(n_objects, int) else list(n_objects))
    out = []
    for i in range(count):
        scene = sample_scene(rng, counts[i % len(counts)], split="eval", eval_fraction=eval_fraction)
        style = styles[(i // len(counts)) % len(styles)]
        out.append(Example(scene, caption(scene, style), style))
    return out


@dataclass(frozen=True)
class PromptSet:
    """A named evaluation set: its caption styles and object counts (drawn at the model's resolution)."""

    styles: tuple[str, ...]
    n_objects: tuple[int, ...] = tuple(range(1, MAX_OBJECTS + 1))

    def examples(self, seed: int, count: int) -> list[Example]:
        return eval_set(seed, count, self.styles, self.n_objects)


PROMPT_SETS: dict[str, PromptSet] = {
    "plain": PromptSet(("plain",)),
    "paraphrase": PromptSet(HELDOUT_STYLES),
    # Only for models trained on long scenes (``long_training``), whose resolution is the long canvas.
    "long": PromptSet(("plain",), (LONG_MAX_OBJECTS,)),
}


def long_training(resolution: int) -> dict[str, Any]:
    """Data overrides that train a model for the "long" set: 1..6 objects on the long canvas."""
    return {"n_objects": list(range(1, LONG_MAX_OBJECTS + 1)), "resolution": round(resolution * LONG_CANVAS)}


def train_pool(
    seed: int,
    count: int,
    n_objects: int | Sequence[int] | None = None,
    styles: Sequence[str] = DEFAULT_TRAIN_STYLES,
    eval_fraction: float = EVAL_FRACTION,
) -> list[Example]:
    """``count`` distinct training captions (train combinations, training templates).

    For a demo whose text encoding is the bottleneck: encode this pool once, then render fresh
    jittered images of its scenes at every step.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7EA1]))
    counts = list(range(1, MAX_OBJECTS + 1)) if n_objects is None else (
        [n_objects] if isinstance(n_objects, int) else list(n_objects))
    seen: set[str] = set()
    out: list[Example] = []
    misses = 0
    while len(out) < count:
        n = counts[int(rng.integers(len(counts)))]
        scene = sample_scene(rng, n, split="train", eval_fraction=eval_fraction)
        style = styles[int(rng.integers(len(styles)))]
        prompt = caption(scene, style)
        if prompt in seen:
            misses += 1
            if misses > 100 * count + 10_000:
                raise ValueError(f"cannot draw {count} distinct training captions")
            continue
        seen.add(prompt)
        out.append(Example(scene, prompt, style))
    return out


def sample_batch(
    rng: np.random.Generator, batch: int, size: int = 64, pool: Sequence[Example] | None = None
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Images (B, H, W, 3 uint8), captions and scenes for one training step.

    From ``pool`` when given (indices drawn with replacement), otherwise fresh training scenes with
    random training captions.
    """
    scenes, prompts = [], []
    for _ in range(batch):
        if pool is not None:
            ex = pool[int(rng.integers(len(pool)))]
            scenes.append(ex.scene)
            prompts.append(ex.prompt)
        else:
            scene = sample_scene(rng, split="train")
            scenes.append(scene)
            prompts.append(sample_caption(scene, rng))
    images = np.stack([render(s, rng, size) for s in scenes])
    return images, prompts, scenes
