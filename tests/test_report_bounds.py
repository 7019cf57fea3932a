"""Per-seed speed-ups that are only bounds stay out of the per-seed mean (issue 26, item 5).

A run already at or below a level at its first evaluated step reached it at that step
or earlier, so a ratio built on that step is a bound, not a measurement: '≥' when it is
the arm's step, '≤' when it is vanilla's, nothing at all when both are. Each test builds
curves where one seed's ratio is such a bound, works out every crossing step by hand
(linear interpolation between the last step above the level and the first one at or
below it, written out below) and every mean with NumPy, and checks that the report's
summary is that of the exact ratios only, with the bound named beside it and the
geometric mean exp(mean(log r)) of the exact ratios next to their arithmetic mean. The
old summary (every ratio averaged as exact) is computed too, to show it differs.
"""

from __future__ import annotations

import numpy as np
import pytest

from experiments import report

STEPS = [100, 200, 300, 400]
LEVEL = 5.0


def _curve(steps: list[float], values: list[float]) -> report.Curve:
    return report.Curve(np.asarray(steps, float), np.asarray(values, float))


def _summary(ratios: list[float]) -> tuple[float, float, float, float, float]:
    """mean, sample std, min, max and geometric mean of `ratios`, by NumPy."""
    r = np.asarray(ratios, float)
    return (float(r.mean()), float(r.std(ddof=1)), float(r.min()), float(r.max()),
            float(np.exp(np.mean(np.log(r)))))


def _per_seed_text(ratios: list[float], n_pairs: int) -> str:
    m, sd, lo, hi, _ = _summary(ratios)
    return f"per seed {m:.2f} ± {sd:.2f} [{lo:.2f}, {hi:.2f}], {len(ratios)}/{n_pairs} pairs"


# Four seeds at level 5; the arm's seed 3 is already below 5 at its first step (4 at 100).
VANILLA = {0: _curve(STEPS, [10, 8, 6, 4]), 1: _curve(STEPS, [10, 9, 6, 2]),
           2: _curve(STEPS, [10, 8, 4, 3]), 3: _curve(STEPS, [10, 9, 8, 4])}
ARM = {0: _curve(STEPS, [10, 6, 4, 3]), 1: _curve(STEPS, [10, 4, 3, 2]),
       2: _curve(STEPS, [10, 7, 3, 2]), 3: _curve(STEPS, [4, 3, 2, 1])}
V_STEPS = {0: 300 + 100 * (6 - 5) / (6 - 4),  # 350
           1: 300 + 100 * (6 - 5) / (6 - 2),  # 325
           2: 200 + 100 * (8 - 5) / (8 - 4),  # 275
           3: 300 + 100 * (8 - 5) / (8 - 4)}  # 375
A_STEPS = {0: 200 + 100 * (6 - 5) / (6 - 4),  # 250
           1: 100 + 100 * (10 - 5) / (10 - 4),  # 183.3
           2: 200 + 100 * (7 - 5) / (7 - 3),  # 250
           3: 100.0}  # at or below 5 at its first step: the true step is at most 100
EXACT = [V_STEPS[k] / A_STEPS[k] for k in (0, 1, 2)]  # 1.40, 1.77, 1.10
BOUND = V_STEPS[3] / A_STEPS[3]  # 3.75: the true ratio is at least this


def test_an_arms_bound_is_left_out_of_the_per_seed_mean_and_named():
    sp = report.speedups(VANILLA, ARM, LEVEL)
    cell = report._speedup_cell(sp)
    old = _per_seed_text([*EXACT, BOUND], 4)  # 2.01 ± 1.19 [1.10, 3.75], 4/4 pairs
    new = _per_seed_text(EXACT, 4)  # 1.42 ± 0.34 [1.10, 1.77], 3/4 pairs
    assert old.split(",")[0] != new.split(",")[0]  # the bound moves the mean: 2.01 vs 1.42
    assert old not in cell
    assert new in cell
    geo = _summary(EXACT)[4]  # (1.40 * 1.77 * 1.10) ** (1 / 3) = 1.40
    assert f"geometric mean {geo:.2f}" in cell
    assert f"1 not exact, left out: seed 3 ≥ {BOUND:.2f}" in cell
    # The seed-mean curves' ratio is not a per-seed aggregate and stays as it was:
    # vanilla's mean (10, 8.5, 6, 3.25) crosses 5 at 300 + 100 * 1 / 2.75; the arm's
    # mean (8.5, 5, 3, 2) is at 5 at step 200.
    assert cell.startswith(f"{(300 + 100 / 2.75) / 200:.2f}× (")
    # The numbers behind the text.
    assert sp["exact"] == {k: pytest.approx(r) for k, r in zip((0, 1, 2), EXACT, strict=True)}
    assert sp["bounds"] == {3: ("≥", pytest.approx(BOUND))} and sp["censored"]
    summ = report.ratio_summary(sp)
    assert summ["geomean"] == pytest.approx(np.exp(np.mean(np.log(EXACT))))
    assert summ["mean"] == pytest.approx(np.mean(EXACT))
    assert summ["std"] == pytest.approx(np.std(EXACT, ddof=1))


def test_the_speedup_table_row_shows_exact_ratios_their_geometric_mean_and_the_bound():
    md = report.speedup_table({"none": VANILLA, "linear": ARM}, "none", [(LEVEL, None)])
    m, sd, lo, hi, geo = _summary(EXACT)
    vanilla_mean_step = 300 + 100 * (6 - 5) / (6 - 3.25)
    head = f"{vanilla_mean_step / 200:.2f}×"
    want = (f"| 5 | {vanilla_mean_step:.0f} | {head} (per seed {m:.2f} ± {sd:.2f} "
            f"[{lo:.2f}, {hi:.2f}], 3/4 pairs; geometric mean {geo:.2f}; 1 not exact, left "
            f"out: seed 3 ≥ {BOUND:.2f}) |")
    assert want in md.splitlines()


def test_vanillas_bound_is_an_upper_bound_and_ratios_average_geometrically():
    """Exact ratios 2 and 0.5: arithmetic mean 1.25, geometric mean 1. Vanilla's seed 2 is
    below 5 at its first step, so that pair's ratio is at most 100 / 325."""
    vanilla = {0: _curve(STEPS, [10, 9, 7, 3]), 1: _curve(STEPS, [8, 4, 3, 2]),
               2: _curve(STEPS, [4, 3, 2, 1])}
    arm = {0: _curve(STEPS, [8, 4, 3, 2]), 1: _curve(STEPS, [10, 9, 7, 3]),
           2: _curve(STEPS, [10, 9, 6, 2])}
    slow = 300 + 100 * (7 - 5) / (7 - 3)  # 350
    fast = 100 + 100 * (8 - 5) / (8 - 4)  # 175
    exact = [slow / fast, fast / slow]  # 2.0, 0.5
    bound = 100 / (300 + 100 * (6 - 5) / (6 - 2))  # 100 / 325 = 0.31
    sp = report.speedups(vanilla, arm, LEVEL)
    cell = report._speedup_cell(sp)
    assert _per_seed_text([*exact, bound], 3) not in cell  # old: 0.94 ± 0.93 [0.31, 2.00]
    assert _per_seed_text(exact, 3) in cell  # 1.25 ± 1.06 [0.50, 2.00], 2/3 pairs
    assert "geometric mean 1.00" in cell
    assert f"1 not exact, left out: seed 2 ≤ {bound:.2f}" in cell
    assert report.ratio_summary(sp)["geomean"] == pytest.approx(1.0)
    assert sp["bounds"] == {2: ("≤", pytest.approx(bound))}
    # A hand-built result without 'exact' / 'bounds' counts every ratio as exact.
    hand = {"pairs": {0: 2.0, 1: 0.5, 2: None}}
    assert report.ratio_summary(hand)["geomean"] == pytest.approx(1.0)
    assert report.ratio_summary(hand)["mean"] == pytest.approx(1.25)


def test_both_runs_already_there_give_no_ratio_and_a_missed_seed_stays_out():
    """Seed 1: vanilla and the arm both below 5 at step 100, so each true step is at most
    100 and their ratio (100 / 100 = 1 by the old reckoning) says nothing. Seed 2: the
    arm never reaches 5 and was never averaged."""
    vanilla = {0: _curve(STEPS, [10, 9, 7, 3]), 1: _curve(STEPS, [4, 3, 2, 1]),
               2: _curve(STEPS, [10, 9, 7, 3])}
    arm = {0: _curve(STEPS, [8, 4, 3, 2]), 1: _curve(STEPS, [5, 4, 3, 2]),
           2: _curve(STEPS, [10, 9, 8, 7])}
    exact = (300 + 100 * (7 - 5) / (7 - 3)) / (100 + 100 * (8 - 5) / (8 - 4))  # 2.0
    sp = report.speedups(vanilla, arm, LEVEL)
    cell = report._speedup_cell(sp)
    assert _per_seed_text([exact, 100 / 100], 3) not in cell  # old: 1.50 ± 0.71, 2/3 pairs
    assert f"per seed {exact:.2f}, 1/3 pairs" in cell
    assert "1 not exact, left out: seed 1: both there at their first evaluated step" in cell
    assert "not reached by seed(s) 2" in cell
    assert sp["bounds"] == {1: ("?", None)} and sp["arm_missed"] == [2]
    assert list(report.ratio_summary(sp)["exact"]) == [0]


def test_a_level_where_every_ratio_is_a_bound_says_so_instead_of_a_number():
    vanilla = {0: _curve(STEPS, [10, 6, 4, 3]), 1: _curve(STEPS, [10, 8, 4, 3])}
    arm = {0: _curve(STEPS, [5, 4, 3, 2]), 1: _curve(STEPS, [3, 2, 1, 1])}
    bounds = [(200 + 100 * (6 - 5) / (6 - 4)) / 100,  # 2.50
              (200 + 100 * (8 - 5) / (8 - 4)) / 100]  # 2.75
    sp = report.speedups(vanilla, arm, LEVEL)
    cell = report._speedup_cell(sp)
    assert _per_seed_text(bounds, 2) not in cell  # old: 2.62 ± 0.18 [2.50, 2.75], 2/2
    assert "±" not in cell and "geometric mean" not in cell
    assert (f"per seed: no exact ratio, 0/2 pairs; not exact: seed 0 ≥ {bounds[0]:.2f}, "
            f"seed 1 ≥ {bounds[1]:.2f}") in cell
    summ = report.ratio_summary(sp)
    assert summ["mean"] is None and summ["geomean"] is None and not summ["exact"]


def test_an_arm_there_at_step_0_is_an_infinite_lower_bound_not_a_crash():
    """An arm evaluated at step 0 and already at the level needs no steps: the ratio is
    unbounded above. The seed-mean headline used to format None (TypeError)."""
    vanilla = {0: _curve([0, 100, 200], [10, 6, 2])}
    arm = {0: _curve([0, 100, 200], [3, 2, 1])}
    sp = report.speedups(vanilla, arm, 4.0)
    assert sp["mean_arm"].step == 0 and sp["mean_arm"].censored
    cell = report._speedup_cell(sp)
    assert cell.startswith("≥ ∞×")
    assert "not exact: seed 0 ≥ ∞" in cell
    assert sp["bounds"] == {0: ("≥", float("inf"))} and sp["pairs"] == {0: None}


def test_paired_differences_match_scipy_paired_t():
    """The per-seed table's differences and t are scipy's `ttest_rel` on the same pairs.

    Seed 3 of the arm has no vanilla partner and vanilla seed 2 misses step 300: both
    must be left out of those pairs, not matched to another seed.
    """
    from scipy import stats

    vanilla = {0: _curve(STEPS, [9.0, 7.0, 5.0, 4.0]), 1: _curve(STEPS, [9.5, 7.2, 5.5, 4.1]),
               2: _curve([100, 200, 400], [8.7, 6.9, 3.8])}
    arm = {0: _curve(STEPS, [8.0, 6.5, 4.0, 3.1]), 1: _curve(STEPS, [9.9, 6.0, 4.6, 3.0]),
           2: _curve(STEPS, [8.8, 6.1, 4.2, 3.3]), 3: _curve(STEPS, [1.0, 1.0, 1.0, 1.0])}
    got = {s: (d, t) for s, d, t in report.paired_differences(vanilla, arm)}
    assert sorted(got) == STEPS
    for step in STEPS:
        seeds = [k for k in (0, 1, 2) if step in vanilla[k].steps]
        a = [float(arm[k].values[arm[k].steps == step][0]) for k in seeds]
        v = [float(vanilla[k].values[vanilla[k].steps == step][0]) for k in seeds]
        d, t = got[step]
        assert list(d) == seeds
        np.testing.assert_allclose(list(d.values()), np.subtract(a, v), rtol=1e-12)
        np.testing.assert_allclose(t, stats.ttest_rel(a, v).statistic, rtol=1e-10)
    table = report.paired_table({"none": vanilla, "linear": arm}, "none")
    assert "| 300 | 0: -1, 1: -0.9 (t " in table


def test_paired_differences_without_spread_give_no_t():
    """One pair, or identical differences, have no t (not a division by zero)."""
    one = report.paired_differences({0: _curve([1], [2.0])}, {0: _curve([1], [1.0])})
    assert one == [(1.0, {0: -1.0}, None)]
    same = report.paired_differences({0: _curve([1], [2.0]), 1: _curve([1], [3.0])},
                                     {0: _curve([1], [1.0]), 1: _curve([1], [2.0])})
    assert same[0][2] is None
