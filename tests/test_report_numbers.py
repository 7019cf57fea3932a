"""The sweep report's numbers against hand computations, and the sweep's done check.

Each expected value is worked out in the test (linear interpolation by hand, medians
and `statistics.stdev`), on curves built so that a plausible slip (the interpolation
fraction taken from the wrong end, a pair's ratio against vanilla's mean curve, a
median that includes the run itself, std with ddof=0) gives another answer.
"""

import json
import os
import statistics

import numpy as np
import pytest

from experiments import report, sweep

QUICKSTART = "configs/quickstart.py"
ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _curve(steps, values):
    return report.Curve(np.asarray(steps, float), np.asarray(values, float))


def test_steps_to_reach_interpolates_from_the_last_step_above_the_level():
    c = _curve([0, 100, 300], [10, 8, 2])
    # Level 7 lies 1/6 of the way from 8 (step 100) down to 2 (step 300).
    assert report.steps_to_reach(c, 7).step == pytest.approx(100 + 200 * (8 - 7) / (8 - 2))
    assert report.steps_to_reach(c, 3).step == pytest.approx(100 + 200 * (8 - 3) / (8 - 2))
    assert not report.steps_to_reach(c, 3).censored


def test_speedup_pairs_runs_by_seed_and_divides_vanilla_by_arm():
    # Piecewise-linear curves through (0, 10) and (s, 0): level 5 is reached at s / 2.
    def line(s):
        return _curve([0, s], [10.0, 0.0])

    vanilla = {0: line(400), 1: line(800), 2: line(600)}
    arm = {1: line(800), 0: line(100)}  # seed 2 has no run in this arm
    sp = report.speedups(vanilla, arm, 5.0)
    assert set(sp["pairs"]) == {0, 1}
    assert sp["pairs"][0] == pytest.approx(200 / 50)  # seed 0 with seed 0
    assert sp["pairs"][1] == pytest.approx(400 / 400)
    # The table's seed-mean curves: vanilla's mean at steps 0, 400, 600, 800 over the
    # seeds evaluated there (one seed at each later step).
    mv = report.mean_curve(vanilla)[0]
    assert mv.steps.tolist() == [0, 400, 600, 800]
    assert mv.values.tolist() == [10.0, 0.0, 0.0, 0.0]
    ma = report.mean_curve(arm)[0]
    assert ma.steps.tolist() == [0, 100, 800] and ma.values.tolist() == [10, 0, 0]
    # The speed-ups' seed means read only the steps every seed evaluated: step 0 here,
    # where neither arm is at 5 (the union's 200 / 50 would mix seeds 0 and 1).
    assert report.mean_curve(vanilla, common=True)[0].steps.tolist() == [0]
    assert sp["mean"] is None and sp["mean_vanilla"].step is None


def test_vanilla_seeds_that_miss_a_level_are_named():
    vanilla = {0: _curve([0, 100], [10, 2]), 1: _curve([0, 100], [10, 6])}
    arm = {0: _curve([0, 100], [10, 2]), 1: _curve([0, 100], [10, 2])}
    sp = report.speedups(vanilla, arm, 4.0)
    assert sp["vanilla_missed"] == [1] and sp["arm_missed"] == []
    assert sp["pairs"] == {0: pytest.approx(1.0), 1: None}
    assert "vanilla seed(s) 1 do not reach it" in report._speedup_cell(sp)


def test_an_arm_already_at_the_level_at_its_first_step_is_a_lower_bound():
    vanilla = {0: _curve([100, 200, 300], [10, 6, 2])}
    arm = {0: _curve([100, 200, 300], [3, 2, 1])}
    sp = report.speedups(vanilla, arm, 4.0)
    assert sp["mean_arm"].censored and sp["censored"]
    assert sp["mean"] == pytest.approx(250 / 100)
    assert report._speedup_cell(sp).startswith("≥ 2.50×")
    # Neither censored: no bound marker.
    plain = report.speedups(vanilla, {0: _curve([100, 200, 300], [10, 2, 1])}, 4.0)
    # The arm crosses 4 at 100 + 100 * (10 - 4) / (10 - 2) = 175.
    assert report._speedup_cell(plain).startswith(f"{250 / 175:.2f}×")


def test_vanilla_already_at_the_level_at_its_first_step_is_an_upper_bound():
    """Vanilla's reach is then an upper bound of its true step, so the ratio is too."""
    vanilla = {0: _curve([100, 200, 300], [3, 2, 1])}
    arm = {0: _curve([100, 200, 300], [10, 6, 2])}
    sp = report.speedups(vanilla, arm, 4.0)
    # The arm crosses 4 at 200 + 100 * (6 - 4) / (6 - 2) = 250; vanilla "at" 100.
    assert sp["mean_vanilla"].censored and sp["mean"] == pytest.approx(100 / 250)
    assert report._speedup_cell(sp).startswith("≤ 0.40×")
    both = report.speedups(vanilla, {0: _curve([100, 200], [2, 1])}, 4.0)
    assert report._speedup_cell(both).startswith("both there at their first evaluated step")


def test_stall_threshold_is_twice_the_median_best_of_the_other_seeds():
    # Bests 1.0, 1.0, 1.6, 2.1 (each curve's last value: no late rise).
    bests = {0: 1.0, 1: 1.0, 2: 1.6, 3: 2.1}
    curves = {"a": {k: _curve([0, 100], [b + 1, b]) for k, b in bests.items()}}
    checks = {h.seed: h for h in report.health(curves)}
    for seed, best in bests.items():
        others = [b for k, b in bests.items() if k != seed]
        want_ok = not best > 2.0 * statistics.median(others)
        assert checks[seed].ok is want_ok, (seed, checks[seed].problems)
    # Seed 3: 2.1 > 2 x median(1.0, 1.0, 1.6) = 2.0; not so against the mean of the
    # others (2 x 1.2) or a median that included itself (2 x 1.3).
    assert not checks[3].ok and checks[0].ok and checks[2].ok


def test_table_and_speedup_cells_use_the_sample_std():
    values = [1.0, 2.0, 4.0]
    curves = {"a": {k: _curve([100], [v]) for k, v in enumerate(values)}}
    mean, sd = statistics.mean(values), statistics.stdev(values)  # ddof = 1
    assert f"| 100 | {mean:.4g} ± {sd:.4g} (n=3) |" in report.table(curves)
    sp = {"mean_vanilla": report.Reach(400.0), "mean_arm": report.Reach(200.0), "mean": 2.0,
          "pairs": {0: 1.0, 1: 2.0, 2: 4.0}, "arm_missed": [], "vanilla_missed": []}
    assert f"per seed {mean:.2f} ± {sd:.2f} [1.00, 4.00], 3/3 pairs" in \
        report._speedup_cell(sp)


def test_rows_of_another_ddim_eta_are_not_mixed_into_a_curve():
    rows = [{"arm": "x", "seed": 0, "step": s, "sampler": "ddim10", "n": 64, "ts": [1.0],
             "eta": eta, "fd_pixels": 1.0} for s, eta in ((100, 0.0), (200, 1.0))]
    with pytest.raises(ValueError, match="different settings"):
        report.arm_curves(rows, "fd_pixels", "ddim10")
    assert list(report.arm_curves(rows[:1], "fd_pixels", "ddim10")) == ["x"]


def _finished(workdir, rows):
    os.makedirs(os.path.join(workdir, "checkpoints", "8"))
    with open(os.path.join(workdir, "eval.jsonl"), "w") as f:
        for step, sampler, n in rows:
            f.write(json.dumps({"step": step, "sampler": sampler, "n": n,
                                "metric": "fd_pixels", "fd_pixels": 1.0}) + "\n")


def test_a_run_is_evaluated_only_with_every_sampler_at_the_final_step(tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(ROOT_DIR)
    sets = ["training.n_iters=8", "eval.n_samples=16", "eval.samplers=('1step','2step')"]
    runs = sweep.expand(sweep.parse_grid(["assignment.method=none,linear,knn"]), [0],
                        str(tmp_path), sets)
    cfg = sweep.resolve_config(QUICKSTART, runs[0].overrides)
    _finished(runs[0].workdir, [(8, "1step", 16), (8, "2step", 16)])
    _finished(runs[1].workdir, [(8, "1step", 16)])  # one sampler of two
    _finished(runs[2].workdir, [(8, "1step", 16), (8, "2step", 100)])  # another n
    assert [sweep.is_done(r, cfg) for r in runs] == [True, False, False]


def test_a_failed_training_is_not_evaluated(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT_DIR)
    runs = sweep.expand([], [0], str(tmp_path), ["training.n_iters=8"])
    modes = []

    def execute(cmd):
        modes.append(cmd[cmd.index("--mode") + 1])
        return 1

    out = sweep.run_sweep(QUICKSTART, runs, execute=execute, log=lambda _: None)
    assert modes == ["train"] and out["failed"] == runs


def test_seed_mean_speedups_read_only_the_steps_every_seed_evaluated():
    """A seed whose evaluation stopped early must not move the seed mean: vanilla seed 1
    lacks step 400, where seed 0 alone (value 4) would pull the 'mean' below level 5 at
    step 350 (interpolated between 6 at 300 and 4 at 400) and give 350 / 300."""
    vanilla = {0: _curve([100, 200, 300, 400], [10, 8, 6, 4]),
               1: _curve([100, 200, 300], [10, 8, 6])}
    arm = {s: _curve([100, 200, 300, 400], [10, 7, 5, 3]) for s in (0, 1)}
    sp = report.speedups(vanilla, arm, 5.0)
    assert sp["mean_vanilla"].step is None and sp["mean"] is None  # 10, 8, 6: not reached
    assert sp["mean_arm"].step == pytest.approx(300)
    assert sp["pairs"][0] == pytest.approx(350 / 300)  # the pair of seed 0 has step 400
    assert report.uneven_steps({"none": vanilla, "linear": arm}) == {"none": [400.0]}
    table = report.table({"none": vanilla})  # every step stays in the table, with its n
    assert "| 400 | 4 (n=1) |" in table
