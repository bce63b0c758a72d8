"""Which emoji does an image show: retrieval among the real emoji images, and its measured ceiling.

Why retrieval and not a trained classifier: 3,781 classes with one image per style leave nothing to
train a classifier on, while a generated image of a trained (label, style) pair should look like the
real image of that pair. Every real image (both styles, held-out ones included: the scorer is not
the model) is put in one canonical frame: cropped to its drawn content, padded square on white,
resized to `size` x `size`, slightly blurred (a generated image is never pixel-sharp). The feature
is those pixels plus a coarse colour histogram of the drawn pixels, each block centred and scaled to
unit norm, then projected by a CCA fitted on the (Noto, Twemoji) image pairs of the same emoji: the
directions in which two artists' drawings of one emoji agree (on held-out concepts it lifts
cross-style top-1 from 26% to 35-39%: docs/emoji.md). A query's answer is the concepts of its nearest
index images by cosine similarity in that space.

The ceiling (`ceiling`): queries that are real images the index does not hold, the only honest
check of a retrieval scorer: each style's images against the other style's index alone (the same
concept drawn by another artist), and OpenMoji's SVGs rasterised (a third artist) against the full
index. A generated image in a trained style should be easier than both; they bound what the scorer
can miss, not what it can find.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .stats import Interval, wilson

SIZE = 24          # side of the canonical frame
HIST_BINS = 4      # per channel, over the drawn pixels
HIST_WEIGHT = 0.5  # the histogram block's share against the pixel block (both unit norm)


def canonical(image: np.ndarray, size: int = SIZE, threshold: int = 24) -> np.ndarray:
    """uint8 (H, W, 3) RGB on white -> float (size, size, 3) in [0, 1]: the drawn content, centred.

    Emoji sets differ in margin (OpenMoji leaves a wide one); cropping to the content makes the
    same concept line up across artists and across the model's 32 or 64 px.
    """
    from PIL import Image, ImageFilter

    ink = (255 - image.astype(np.int16)).max(axis=2) > threshold
    if ink.any():
        rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
        image = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = image.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), 255, np.uint8)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = image
    pil = Image.fromarray(square).resize((size, size), Image.Resampling.BOX)
    pil = pil.filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(pil, np.float32) / 255.0


def features(images: Sequence[np.ndarray], size: int = SIZE) -> np.ndarray:
    """(N, D) float32 unit vectors: canonical pixels (centred) and a colour histogram of the ink."""
    frames = np.stack([canonical(np.asarray(im)[..., :3], size) for im in images])
    pixels = frames.reshape(len(frames), -1)
    pixels = pixels - pixels.mean(axis=1, keepdims=True)
    ink = (1 - frames).max(axis=3) > 0.1
    q = np.minimum((frames * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    bins = (q[..., 0] * HIST_BINS + q[..., 1]) * HIST_BINS + q[..., 2]
    hist = np.zeros((len(frames), HIST_BINS ** 3), np.float32)
    for i in range(len(frames)):
        hist[i] = np.bincount(bins[i][ink[i]], minlength=HIST_BINS ** 3)
    hist = np.sqrt(hist)
    blocks = [_unit(pixels), HIST_WEIGHT * _unit(hist - hist.mean(axis=1, keepdims=True))]
    return _unit(np.concatenate(blocks, axis=1)).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


@dataclass(frozen=True)
class Projection:
    """Centre, project, renormalise: the space in which retrieval compares features."""

    mean: np.ndarray
    matrix: np.ndarray  # (D, d)

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        return _unit((feats - self.mean) @ self.matrix).astype(np.float32)


def fit_projection(a: np.ndarray, b: np.ndarray, dims: int = 512, reg: float = 0.3) -> Projection:
    """A regularised CCA between paired features `a[i]` <-> `b[i]` (the same emoji in two styles),
    in the top `dims` principal directions; both views share the mean of the two projections,
    weighted by the canonical correlations, so queries and index live in one space."""
    x = np.concatenate([a, b]).astype(np.float64)
    mean = x.mean(axis=0)
    basis = np.linalg.svd(x - mean, full_matrices=False)[2][:dims].T
    pa, pb = (a - mean) @ basis, (b - mean) @ basis

    def whiten(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(c + reg * np.trace(c) / len(c) * np.eye(len(c)))
        return v @ np.diag(w ** -0.5) @ v.T

    wa, wb = whiten(pa.T @ pa / len(pa)), whiten(pb.T @ pb / len(pb))
    u, corr, vt = np.linalg.svd(wa @ (pa.T @ pb / len(pa)) @ wb)
    matrix = basis @ ((wa @ u + wb @ vt.T) / 2) * np.sqrt(corr)
    return Projection(mean.astype(np.float32), matrix.astype(np.float32))


def read_real(root: str | Path, style: str, keys: Sequence[str]) -> list[np.ndarray]:
    """`<root>/real/<style>/<key>.png` as RGB arrays (made by scripts/provision_emoji.py)."""
    from PIL import Image

    folder = Path(root) / "real" / style
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: provision the emoji with "
                                f"`python scripts/provision_emoji.py --out {root}`")
    return [np.asarray(Image.open(folder / f"{k}.png").convert("RGB")) for k in keys]


@dataclass
class Scorer:
    """An index of real emoji images: `keys[i]` is the concept (image key) of index row i."""

    keys: list[str]
    index: np.ndarray
    projection: Projection | None = None
    size: int = SIZE

    @classmethod
    def from_folder(cls, root: str | Path, styles: Sequence[str] = ("google", "twitter"),
                    keys: Sequence[str] | None = None, fit_keys: Sequence[str] | None = None,
                    size: int = SIZE) -> Scorer:
        """Index every style's images of `keys` (default: every emoji of the catalogue); the projection
        is fitted on the style pairs of `fit_keys` (default: the indexed emoji drawn in both styles)."""
        from ..data.emoji import load_catalog

        emojis, _ = load_catalog(root)
        drawn = {s: {e.key for e in emojis if s in e.styles} for s in ("google", "twitter")}
        keys = [e.key for e in emojis] if keys is None else list(keys)
        pairs = [k for k in (keys if fit_keys is None else fit_keys) if k in drawn["google"] and k in drawn["twitter"]]
        raw = {s: dict(zip(pairs, features(read_real(root, s, pairs), size))) for s in ("google", "twitter")}
        projection = fit_projection(np.stack([raw["google"][k] for k in pairs]),
                                    np.stack([raw["twitter"][k] for k in pairs])) if len(pairs) > 1 else None
        index_keys, rows = [], []
        for style in styles:
            todo = [k for k in keys if k in drawn[style]]
            missing = [k for k in todo if k not in raw[style]]
            extra = dict(zip(missing, features(read_real(root, style, missing), size))) if missing else {}
            index_keys += todo
            rows += [raw[style].get(k, extra.get(k)) for k in todo]
        index = np.stack(rows)
        return cls(index_keys, projection(index) if projection else index, projection, size)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        feats = features(images, self.size)
        return self.projection(feats) if self.projection else feats

    def rank(self, images: Sequence[np.ndarray], k: int = 5) -> list[list[str]]:
        """The k most likely concepts per image, best first (each concept once)."""
        sims = torch.from_numpy(self.embed(images)) @ torch.from_numpy(self.index).T
        # a concept has one row per style, so the best 64 x k rows always hold k concepts
        order = sims.topk(min(sims.shape[1], 64 * k), dim=1).indices
        out = []
        for row in order.tolist():
            found: list[str] = []
            for i in row:
                if self.keys[i] not in found:
                    found.append(self.keys[i])
                    if len(found) == k:
                        break
            out.append(found)
        return out


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 with their 95% Wilson intervals over `n` queries."""

    n: int
    top1: Interval
    top5: Interval

    def to_dict(self) -> dict:
        return {"n": self.n, "top1": self.top1.to_dict(), "top5": self.top5.to_dict()}

    def __str__(self) -> str:
        return (f"top-1 {self.top1.value:.1%} [{self.top1.lo:.1%}, {self.top1.hi:.1%}], top-5 {self.top5.value:.1%} "
                f"[{self.top5.lo:.1%}, {self.top5.hi:.1%}], n = {self.n}")


def accuracy(ranked: Sequence[Sequence[str]], truth: Sequence[str]) -> Accuracy:
    """Top-1 / top-5 of ranked answers against the true keys, each a Wilson 95% interval."""
    n = len(truth)
    top1 = sum(r[:1] == [t] for r, t in zip(ranked, truth))
    top5 = sum(t in r[:5] for r, t in zip(ranked, truth))
    return Accuracy(n, wilson(top1, n), wilson(top5, n))


def rasterise_svg(svg: bytes, size: int = 64) -> np.ndarray:
    """An SVG as uint8 RGB on white (needs `pip install cairosvg`, which uses the system's libcairo)."""
    try:
        import cairosvg
    except (ImportError, OSError) as e:
        raise ImportError(f"rasterising OpenMoji needs cairosvg and libcairo: `pip install cairosvg` "
                          f"(Debian: apt-get install libcairo2) ({e})") from None
    from ..data.emoji import on_white

    return np.asarray(on_white(cairosvg.svg2png(bytestring=svg, output_width=size, output_height=size)))
