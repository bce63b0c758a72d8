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


def cluster_bootstrap(correct: np.ndarray, total: np.ndarray, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED, level: float = 0.95,
                      minus: tuple[np.ndarray, np.ndarray] | None = None) -> Interval:
    """Interval of sum(correct) / sum(total) resampling seeds (rows) and prompts (columns).

    `correct` and `total` are (seeds, prompts) counts, e.g. right objects and objects of the
    selected kind in each prompt's image; a prompt with total 0 simply contributes nothing.
    Each resample weights cell (s, p) by (times seed s was drawn) x (times prompt p was drawn).
    `minus`: another (correct, total) pair on the same seeds and prompts; the interval is then of
    the difference of the two ratios, both taken from the same resamples. That is the paired
    comparison for two kinds of object in the same images (the first and the last object), much
    tighter than comparing two separate intervals.
    """
    pairs = [(correct, total)] + ([minus] if minus is not None else [])
    pairs = [(np.asarray(c, np.float64), np.asarray(t, np.float64)) for c, t in pairs]
    shape = pairs[0][0].shape
    if len(shape) != 2 or any(a.shape != shape for pair in pairs for a in pair):
        raise ValueError(f"expected (seeds, prompts) arrays of one shape, got {[a.shape for p in pairs for a in p]}")
    n_seeds, n_prompts = shape
    method = f"cluster bootstrap, {n_seeds} seed(s) x {n_prompts} prompts, {resamples} resamples"
    with np.errstate(invalid="ignore", divide="ignore"):
        value = _signed([c.sum() / t.sum() for c, t in pairs])
        if value != value:
            return Interval(value, value, value, method)
        rng = np.random.default_rng(seed)
        seed_w = _multiplicities(rng, resamples, n_seeds)
        prompt_w = _multiplicities(rng, resamples, n_prompts)
        stats = _signed([np.einsum("rs,sp,rp->r", seed_w, c, prompt_w) / np.einsum("rs,sp,rp->r", seed_w, t, prompt_w)
                         for c, t in pairs])
    stats = stats[np.isfinite(stats)]  # a resample that drew no object of the kind
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    if lo == hi and minus is None:  # every resample alike (all right, all wrong): that proves nothing
        cells = int((pairs[0][1] > 0).sum())
        bound = wilson(round(value * cells), cells, z=NormalDist().inv_cdf(1 - (1 - level) / 2))
        return Interval(float(value), bound.lo, bound.hi, f"{method}; all alike: Wilson with the {cells} "
                        "seed x prompt cells as trials")
    return Interval(float(value), float(lo), float(hi), method)


def _signed(ratios: list):
    """The ratio, or the first minus the second."""
    return ratios[0] - ratios[1] if len(ratios) == 2 else ratios[0]


def _multiplicities(rng: np.random.Generator, resamples: int, n: int) -> np.ndarray:
    """(resamples, n): how often each of n units is drawn in each resample of size n."""
    weights = np.zeros((resamples, n))
    np.add.at(weights, (np.arange(resamples)[:, None], rng.integers(n, size=(resamples, n))), 1)
    return weights


def separated(a: Interval, b: Interval) -> bool:
    """True when the two intervals do not overlap: only then does the benchmark call a difference.

    Non-overlap of two 95% intervals is a conservative test (for equal widths it is about a 0.6%
    two-sided level); overlapping intervals do not prove equality, they only fail to show a difference.
    """
    return a.hi < b.lo or b.hi < a.lo
