"""The interval math behind every figure of the benchmark: if it breaks, the README's claims do."""
from __future__ import annotations

import numpy as np
import pytest

from lidit.study.stats import Interval, cluster_bootstrap, difference, separated, wilson


def test_wilson_matches_hand_computed_values():
    # 5 of 10: centre (0.5 + z²/20) / (1 + z²/10) = 0.5, half width z sqrt(0.025 + z²/400) / (1 + z²/10)
    assert (wilson(5, 10).lo, wilson(5, 10).hi) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert (wilson(0, 10).lo, wilson(0, 10).hi) == pytest.approx((0.0, 0.277533), abs=1e-6)
    # the README's demo figure: 147 of 150 objects
    assert (wilson(147, 150).lo, wilson(147, 150).hi) == pytest.approx((0.942853, 0.993175), abs=1e-6)
    assert wilson(150, 150).hi == 1.0 and wilson(0, 0).value != wilson(0, 0).value  # nan without trials


def test_wilson_covers_a_known_binomial():
    rng = np.random.default_rng(0)
    p, n = 0.8, 150
    hits = [(lambda iv: iv.lo <= p <= iv.hi)(wilson(int(k), n)) for k in rng.binomial(n, p, size=4000)]
    assert 0.93 <= np.mean(hits) <= 0.97


def test_cluster_bootstrap_covers_a_known_rate_and_is_reproducible():
    rng = np.random.default_rng(1)
    p, prompts, objects = 0.7, 200, 2
    hits = []
    for _ in range(200):
        correct = rng.binomial(objects, p, size=(1, prompts))
        iv = cluster_bootstrap(correct, np.full_like(correct, objects), resamples=500)
        hits.append(iv.lo <= p <= iv.hi)
    assert 0.90 <= np.mean(hits) <= 0.99
    data = rng.binomial(objects, p, size=(3, prompts))
    assert cluster_bootstrap(data, np.full_like(data, 2)) == cluster_bootstrap(data, np.full_like(data, 2))


def test_cluster_bootstrap_resamples_prompts_and_seeds_not_objects():
    rng = np.random.default_rng(2)
    # Four objects per prompt, all right or all wrong together: 400 objects but only 100 independent units.
    whole = 4 * rng.binomial(1, 0.5, size=(1, 100))
    clustered = cluster_bootstrap(whole, np.full_like(whole, 4))
    binomial = wilson(int(whole.sum()), 400)
    assert (clustered.hi - clustered.lo) > 1.6 * (binomial.hi - binomial.lo)  # ~2x = sqrt(4 objects per unit)
    # Seeds that disagree widen the interval; identical seeds do not.
    same = np.repeat(rng.binomial(2, 0.6, size=(1, 200)), 3, axis=0)
    apart = same.copy()
    apart[0], apart[2] = np.minimum(same[0] + 1, 2), np.maximum(same[2] - 1, 0)
    def width(c):
        return (lambda iv: iv.hi - iv.lo)(cluster_bootstrap(c, np.full_like(c, 2)))
    assert width(apart) > 1.5 * width(same)


def test_cluster_bootstrap_pools_objects_not_prompt_means():
    # prompt 0: 1 of 1 right; prompt 1: 0 of 3 right -> 1/4 of the objects, not the mean of 1 and 0
    iv = cluster_bootstrap(np.array([[1, 0]]), np.array([[1, 3]]))
    assert iv.value == 0.25 and 0.0 <= iv.lo <= iv.value <= iv.hi <= 1.0
    with pytest.raises(ValueError):
        cluster_bootstrap(np.zeros((2, 3)), np.ones((3, 2)))


def test_all_right_gets_an_interval_of_the_cells_not_zero_width():
    # 20 prompts x 2 seeds, every object right: each resample is 100% again, which proves nothing;
    # the interval is Wilson's with the 40 seed x prompt cells (not the 80 objects) as trials.
    total = np.full((2, 20), 2)
    right = cluster_bootstrap(total, total)
    assert right.value == 1.0 and (right.lo, right.hi) == pytest.approx((wilson(40, 40).lo, 1.0))
    wrong = cluster_bootstrap(np.zeros_like(total), total)
    assert wrong.value == 0.0 and (wrong.lo, wrong.hi) == pytest.approx((0.0, wilson(0, 40).hi))
    assert 0.9 < right.lo < 0.95  # wider than Wilson over the 80 objects (0.954)


def test_separated_only_when_intervals_do_not_overlap():
    a, b, c = Interval(0.5, 0.4, 0.6, "x"), Interval(0.7, 0.61, 0.8, "x"), Interval(0.65, 0.55, 0.75, "x")
    assert separated(a, b) and separated(b, a)
    assert not separated(a, c) and not separated(c, b)


def test_paired_difference_sees_what_two_overlapping_intervals_cannot():
    rng = np.random.default_rng(3)
    first = rng.binomial(1, 0.6, size=(1, 300))
    last = first * (rng.random((1, 300)) > 0.12)  # the same images, the last object lost in ~12% of them
    ones = np.ones_like(first)
    a, b = cluster_bootstrap(first, ones), cluster_bootstrap(last, ones)
    gap = cluster_bootstrap(first, ones, minus=(last, ones))
    assert not separated(a, b)  # apart, the two intervals overlap ...
    assert gap.value == pytest.approx(a.value - b.value) and 0 < gap.lo <= gap.value <= gap.hi  # ... paired, no


def test_difference_between_variants_is_paired_by_prompt():
    # Prompts differ in difficulty, shared by both variants; b loses ~5 points more. Apart, the two
    # intervals overlap; the difference, with the prompts drawn once for both, excludes 0.
    rng = np.random.default_rng(4)
    ease = rng.uniform(0.5, 1.0, size=(1, 400))
    a = (rng.random((3, 400)) < ease).astype(int)
    b = a * (rng.random((3, 400)) > 0.06)
    ones = np.ones_like(a)
    ia, ib, d = cluster_bootstrap(a, ones), cluster_bootstrap(b, ones), difference([(a, ones)], [(b, ones)])
    assert not separated(ia, ib)
    assert d.value == pytest.approx(ia.value - ib.value) and 0 < d.lo <= d.value <= d.hi
    assert "3 vs 3 seed(s) x 400 shared prompts" in d.method
    # A gap (two pairs) minus another: the first-last gap of a against b's, with b's last objects lost.
    gap = difference([(a, ones), (a, ones)], [(a, ones), (b, ones)])
    assert gap.value == pytest.approx(-(ia.value - ib.value)) and gap.hi < 0
    with pytest.raises(ValueError, match="same prompts"):
        difference([(a, ones)], [(a[:, :300], ones[:, :300])])


def test_difference_covers_zero_when_variants_are_alike_and_counts_seeds_per_variant():
    # Two seeds each, no seed effect: the interval errs wide (resampling two seeds counts their
    # object-level noise again as seed-to-seed spread), about 1.3x the true spread, never narrow.
    rng = np.random.default_rng(5)
    ease = rng.uniform(0.6, 1.0, size=(1, 150))
    values, widths = [], []
    for _ in range(200):
        a, b = ((rng.random((2, 150)) < ease).astype(int) for _ in range(2))
        iv = difference([(a, np.ones_like(a))], [(b, np.ones_like(b))], resamples=400)
        values.append(iv.value)
        widths.append((iv.hi - iv.lo) / (2 * 1.96))
        assert iv.lo <= iv.value <= iv.hi
    assert 1.0 < np.mean(widths) / np.std(values) < 1.6
    # Seeds of one variant that disagree widen the difference; a variant may have fewer seeds.
    base = rng.binomial(1, 0.8, size=(1, 300))
    same, apart = np.repeat(base, 3, axis=0), np.repeat(base, 3, axis=0)
    apart[0], apart[2] = np.maximum(base[0], rng.binomial(1, 0.5, 300)), base[0] * rng.binomial(1, 0.7, 300)
    def width(iv):
        return iv.hi - iv.lo
    ones = np.ones((3, 300))
    assert width(difference([(apart, ones)], [(base, ones[:1])])) > 1.5 * width(difference([(same, ones)], [(base, ones[:1])]))
