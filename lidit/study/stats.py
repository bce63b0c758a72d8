"""95% intervals for the benchmark's accuracies, and when two of them may be called different.

Objects are not independent trials: the objects of one prompt share one image (a bad sample
spoils several), and every training seed is a different model. Counting objects as binomial
trials would make the intervals too narrow, so the benchmark uses a **cluster bootstrap**: the
resampled units are whole prompts and whole training seeds, never single objects. All runs of a
variant are scored on the same prompts, so seeds and prompts are crossed, not nested; each
resample draws the seeds and the prompts independently with replacement (the "pigeonhole"
bootstrap for crossed designs, Owen 2007), which covers both sources of variation and errs on the
wide side. The statistic is the pooled ratio (correct objects / objects) of the resampled cells;
the interval is the 2.5th and 97.5th percentile over `RESAMPLES` resamples from a fixed RNG seed,
so a rerun prints the same interval.

With few seeds the seed part is estimated from few clusters (3 seeds give only 10 distinct
resamples of the seeds), so treat the seed component as a lower bound; the per-seed values are
in the benchmark's JSON for anyone who wants a t-interval on them.

Two variants are compared by `difference`: the same bootstrap on the difference of their figures,
the prompts drawn once for both (they were scored on the same prompts), each variant's seeds drawn
on their own. A difference is called only when that interval excludes 0.

`wilson` is the binomial score interval, for published counts where no per-prompt data exists,
and for a group whose objects are all right (or all wrong): there every bootstrap resample is
100% again, a zero-width interval; the Wilson interval with the seed x prompt cells as trials,
fewer than the objects, is the honest width.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
RESAMPLES = 2000
BOOTSTRAP_SEED = 20240611  # fixed: the same data always gives the same interval


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval (fractions in 0..1) and how the interval was made."""

    value: float
    lo: float
    hi: float
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def wilson(correct: int, total: int, z: float = Z95) -> Interval:
    """Wilson score interval of a binomial proportion: sane at 0 and at n, unlike the Wald interval."""
    if total <= 0:
        return Interval(float("nan"), float("nan"), float("nan"), "wilson")
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), "wilson")


Counts = tuple[np.ndarray, np.ndarray]  # (seeds, prompts) arrays: right and counted objects per cell


def cluster_bootstrap(correct: np.ndarray, total: np.ndarray, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED, level: float = 0.95, minus: Counts | None = None) -> Interval:
    """Interval of sum(correct) / sum(total) resampling seeds (rows) and prompts (columns).

    `correct` and `total` are (seeds, prompts) counts, e.g. right objects and objects of the
    selected kind in each prompt's image; a prompt with total 0 simply contributes nothing.
    Each resample weights cell (s, p) by (times seed s was drawn) x (times prompt p was drawn).
    `minus`: another (correct, total) pair on the same seeds and prompts; the interval is then of
    the difference of the two ratios, both taken from the same resamples. That is the paired
    comparison for two kinds of object in the same images (the first and the last object), much
    tighter than comparing two separate intervals.
    """
    figure = _figure([(correct, total)] + ([minus] if minus is not None else []))
    n_seeds, n_prompts = figure[0][0].shape
    method = f"cluster bootstrap, {n_seeds} seed(s) x {n_prompts} prompts, {resamples} resamples"
    value = _point(figure)
    if value != value:
        return Interval(value, value, value, method)
    rng = np.random.default_rng(seed)
    seed_w = _multiplicities(rng, resamples, n_seeds)
    lo, hi = _percentiles(_resampled(figure, seed_w, _multiplicities(rng, resamples, n_prompts)), level)
    if lo == hi and minus is None:  # every resample alike (all right, all wrong): that proves nothing
        cells = int((figure[0][1] > 0).sum())
        bound = wilson(round(value * cells), cells, z=NormalDist().inv_cdf(1 - (1 - level) / 2))
        return Interval(float(value), bound.lo, bound.hi, f"{method}; all alike: Wilson with the {cells} "
                        "seed x prompt cells as trials")
    return Interval(float(value), float(lo), float(hi), method)


def difference(a: list[Counts], b: list[Counts], resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED,
               level: float = 0.95) -> Interval:
    """Interval of figure a minus figure b, for two variants scored on the same prompts.

    A figure is one (correct, total) pair (a ratio) or two (a paired gap, the first minus the
    second, as `cluster_bootstrap`'s `minus`). Each resample draws the prompts once for both
    variants, so a prompt that is hard for both cancels out (paired by prompt), and each variant's
    training seeds on their own: they are different models, whatever their seed number. This is
    the direct test of a difference; two separate 95% intervals that do not overlap are a far
    stricter one (about a 0.6% level), which misses real differences of the size of one interval.
    With two or three seeds it still errs wide: resampling so few seeds counts their object-level
    noise again as seed-to-seed spread (about 1.3x the true spread in `tests/unit/test_stats.py`).
    """
    a, b = _figure(a), _figure(b)
    if a[0][0].shape[1] != b[0][0].shape[1]:
        raise ValueError(f"variants scored on {a[0][0].shape[1]} and {b[0][0].shape[1]} prompts: "
                         "a paired difference needs the same prompts")
    method = (f"paired cluster bootstrap, {a[0][0].shape[0]} vs {b[0][0].shape[0]} seed(s) x "
              f"{a[0][0].shape[1]} shared prompts, {resamples} resamples")
    value = _point(a) - _point(b)
    if value != value:
        return Interval(value, value, value, method)
    rng = np.random.default_rng(seed)
    prompt_w = _multiplicities(rng, resamples, a[0][0].shape[1])
    stats = (_resampled(a, _multiplicities(rng, resamples, a[0][0].shape[0]), prompt_w)
             - _resampled(b, _multiplicities(rng, resamples, b[0][0].shape[0]), prompt_w))
    lo, hi = _percentiles(stats, level)
    return Interval(float(value), float(lo), float(hi), method)


def _figure(pairs: list[Counts]) -> list[Counts]:
    """The pairs as float arrays, checked to be (seeds, prompts) of one shape."""
    pairs = [(np.asarray(c, np.float64), np.asarray(t, np.float64)) for c, t in pairs]
    shape = pairs[0][0].shape
    if len(shape) != 2 or any(a.shape != shape for pair in pairs for a in pair):
        raise ValueError(f"expected (seeds, prompts) arrays of one shape, got {[a.shape for p in pairs for a in p]}")
    return pairs


def _point(figure: list[Counts]) -> float:
    """The figure on the data as it is: the ratio, or the first ratio minus the second."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(_signed([c.sum() / t.sum() for c, t in figure]))


def _resampled(figure: list[Counts], seed_w: np.ndarray, prompt_w: np.ndarray) -> np.ndarray:
    """(resamples,): the figure in each resample, weighting cell (s, p) by seed_w[r, s] * prompt_w[r, p]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return _signed([np.einsum("rs,sp,rp->r", seed_w, c, prompt_w) / np.einsum("rs,sp,rp->r", seed_w, t, prompt_w)
                        for c, t in figure])


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` interval, skipping resamples that drew no object of the kind."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(stats[np.isfinite(stats)], [tail, 100 - tail])
    return float(lo), float(hi)


def _signed(ratios: list):
    """The ratio, or the first minus the second."""
    return ratios[0] - ratios[1] if len(ratios) == 2 else ratios[0]


def _multiplicities(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """(resamples, n): how often each of n units is drawn in each resample of size n."""
    weights = np.zeros((resamples, n))
    np.add.at(weights, (np.arange(resamples)[:, None], rng.integers(n, size=(resamples, n))), 1)
    return weights


def separated(a: Interval, b: Interval) -> bool:
    """True when the two intervals do not overlap: the stricter test, reported beside `difference`.

    Non-overlap of two 95% intervals is a conservative test (for equal widths it is about a 0.6%
    two-sided level); overlapping intervals do not prove equality, they only fail to show a difference.
    """
    return a.hi < b.lo or b.hi < a.lo
