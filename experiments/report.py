"""The report of a sweep: metric-vs-steps curves (PNG), a table and the speed-up (Markdown).

  python -m experiments.report --root runs/sweep [--metric fd_pixels] [--sampler 1step]

Reads every `<root>/<arm>/seed<k>/eval.jsonl` (or `<root>/results.jsonl` when there are
no workdirs, e.g. rows copied back from a cluster) and writes `<root>/report.md` and
`<root>/curves.png`. Lower metric values are better (FID, `fd_pixels`). The speed-up of
an arm at a quality level is, as in the immiscible-diffusion paper, the number of steps
vanilla needs to reach the level divided by the number the arm needs; steps to reach a
level are read off each curve by linear interpolation between evaluated steps. A per-seed
ratio is only a bound when a run is already at the level at its first evaluated step; such
ratios are named and kept out of the per-seed mean, spread and geometric mean (`speedups`).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

REPORT = "report.md"
PLOT = "curves.png"
VANILLA = "assignment.method=none"

__all__ = ["Curve", "Health", "Reach", "arm_curves", "default_levels", "health",
           "load_rows", "main", "mean_curve", "plot", "ratio_summary", "relaunches",
           "setting", "speedups", "steps_to_reach", "table", "uneven_steps", "write_report"]

RISE = 0.5  # a run whose last value is more than 50% above its own best is unhealthy
STALL = 2.0  # ... and one whose best stays above 2x the median best of its arm's other seeds


@dataclasses.dataclass(frozen=True)
class Curve:
    """A metric against training steps (ascending steps)."""

    steps: np.ndarray  # [T]
    values: np.ndarray  # [T]


@dataclasses.dataclass(frozen=True)
class Reach:
    """When a curve first reaches a level: `step` (None: never), and whether the curve was
    already at or below the level at its first evaluated step (then `step` is that step,
    an upper bound of the true one)."""

    step: float | None
    censored: bool = False


@dataclasses.dataclass(frozen=True)
class Health:
    """The health of one run's curve (lower values are better).

    `problems` is empty for a healthy run; otherwise each entry says what is wrong:
    'ends X% above its best' (diverged or collapsed late) or 'best B never gets below
    L' (stalled: never reached the level the other runs reach).
    """

    arm: str
    seed: int
    best: float
    best_step: float
    last: float
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


# ----------------------------------------------------------------------------------------
# Reading.

_SEED_DIR = re.compile(r"^seed(\d+)$")


def load_rows(root: str) -> list[dict]:
    """Every eval row of a sweep root, with 'arm' and 'seed'.

    Rows come from the workdirs `<root>/<arm>/seed<k>/eval.jsonl` (always current, even
    for a sweep that was interrupted); `<root>/results.jsonl` is the fallback.
    """
    rows: list[dict] = []
    for path in sorted(glob.glob(os.path.join(root, "*", "seed*", "eval.jsonl"))):
        seed_dir = os.path.dirname(path)
        m = _SEED_DIR.match(os.path.basename(seed_dir))
        if not m:
            continue
        arm = os.path.basename(os.path.dirname(seed_dir))
        with open(path) as f:
            rows += [{**json.loads(line), "arm": arm, "seed": int(m.group(1))}
                     for line in f if line.strip()]
    if not rows and os.path.exists(os.path.join(root, "results.jsonl")):
        with open(os.path.join(root, "results.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return rows


def setting(row: dict) -> tuple:
    """What an eval row was computed with besides its sampler's name: the number of
    samples, the sampler's times (e.g. 2step's intermediate time) and DDIM's eta."""
    return row.get("n"), tuple(row.get("ts") or ()), row.get("eta")


def _describe(s: tuple) -> str:
    n, ts, eta = s
    return f"n={n} ts={list(ts)}" + ("" if eta is None else f" eta={eta}")


def arm_curves(rows: Sequence[dict], metric: str, sampler: str, n: int | None = None
               ) -> dict[str, dict[int, Curve]]:
    """{arm: {seed: curve}} of one metric and sampler (the last row wins for a step).

    Every row of the curves must share one `setting` (sample count, times, eta): FID
    falls with the sample count, so a curve or a comparison that mixed them would show
    differences that training never made. `n` picks the rows of one sample count.

    Raises:
      ValueError: the selected rows were evaluated with different settings.
    """
    rows = [r for r in rows if r.get("sampler") == sampler and r.get(metric) is not None
            and (n is None or r.get("n") == n)]
    counts: dict[tuple, int] = {}
    for r in rows:
        counts[setting(r)] = counts.get(setting(r), 0) + 1
    if len(counts) > 1:
        listed = "; ".join(f"{_describe(s)}: {c} rows" for s, c in sorted(
            counts.items(), key=lambda x: -x[1]))
        raise ValueError(
            f"the {metric!r} rows of sampler {sampler!r} were evaluated with different "
            f"settings ({listed}); curves mixing them would compare unlike numbers. Pick a "
            "sample count with --n, or move the other rows out of the eval.jsonl files")
    points: dict[str, dict[int, dict[int, float]]] = {}
    for r in rows:
        points.setdefault(r["arm"], {}).setdefault(int(r["seed"]), {})[int(r["step"])] = \
            float(r[metric])
    out: dict[str, dict[int, Curve]] = {}
    for arm in sorted(points):
        out[arm] = {}
        for seed, by_step in sorted(points[arm].items()):
            steps = np.array(sorted(by_step), dtype=float)
            out[arm][seed] = Curve(steps, np.array([by_step[int(s)] for s in steps]))
    return out


def relaunches(root: str) -> list[str]:
    """One line per workdir of the sweep that a relaunch changed: the step it resumed at
    and the fields it changed (the trainer's `config_changes.jsonl`); [] if none was."""
    lines = []
    for path in sorted(glob.glob(os.path.join(root, "*", "seed*", "config_changes.jsonl"))):
        seed_dir = os.path.dirname(path)
        arm = os.path.basename(os.path.dirname(seed_dir))
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    fields = ", ".join(f"`{k}` {old!r} -> {new!r}"
                                       for k, (old, new) in sorted(r["changed"].items()))
                    lines.append(f"- `{arm}` {os.path.basename(seed_dir)}, relaunched at "
                                 f"step {r['step']}: {fields}")
    return lines


def mean_curve(curves: dict[int, Curve], common: bool = False,
               ) -> tuple[Curve, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The seed mean at every step some seed evaluated, with std, min, max and count.

    With `common`, only at the steps every seed evaluated: a mean over a changing set of
    seeds (one run's evaluation cut short, say) would move where no run moved, so the
    speed-ups read the common steps only (the table and the plot show every step, with
    its count).
    """
    sets = [{float(s) for s in c.steps} for c in curves.values()]
    steps = np.array(sorted(set.intersection(*sets) if common else set.union(*sets)))
    per_step = [[float(c.values[c.steps == s][0]) for c in curves.values() if s in c.steps]
                for s in steps]
    mean = np.array([np.mean(v) for v in per_step])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per_step])
    lo = np.array([np.min(v) for v in per_step])
    hi = np.array([np.max(v) for v in per_step])
    count = np.array([len(v) for v in per_step])
    return Curve(steps, mean), std, lo, hi, count


def uneven_steps(curves: dict[str, dict[int, Curve]]) -> dict[str, list[float]]:
    """Per arm, the steps that some seeds evaluated and others did not (none: left out)."""
    out = {}
    for arm, per_seed in curves.items():
        sets = [{float(s) for s in c.steps} for c in per_seed.values()]
        if missing := sorted(set.union(*sets) - set.intersection(*sets)):
            out[arm] = missing
    return out


# ----------------------------------------------------------------------------------------
# Health: runs that diverged, collapsed late or never trained.


def health(curves: dict[str, dict[int, Curve]], rise: float = RISE,
           stall: float = STALL) -> list[Health]:
    """Checks every run's curve; returns one `Health` per run (arm order, then seed).

    A run is unhealthy when
    - its last value is more than `rise` (0.5: 50%) above its own best value, i.e. it got
      worse late and did not recover (divergence, collapse); or
    - its best value is more than `stall` (2x) the median best of the other seeds of its
      arm, i.e. it never gets to the level the same recipe reaches with other seeds. (A
      whole arm that is slower than another is a result, not a fault: it is compared
      within the arm.)
    Both read the metric as lower-is-better and positive (FID, Fréchet distances).

    Example: values (6, 2, 1, 1.6): best 1, last 1.6 = 60% above it -> unhealthy.
    """
    out = []
    for arm, per_seed in curves.items():
        bests = {k: float(np.min(c.values)) for k, c in per_seed.items() if len(c.values)}
        for seed, c in per_seed.items():
            if seed not in bests:
                continue
            i = int(np.argmin(c.values))
            best, last = bests[seed], float(c.values[-1])
            problems = []
            if last > (1.0 + rise) * best:
                problems.append(f"ends {100 * (last / best - 1):.0f}% above its best "
                                f"({_fmt(last)} at step {int(c.steps[-1])} against "
                                f"{_fmt(best)} at step {int(c.steps[i])})")
            others = [b for k, b in bests.items() if k != seed]
            typical = float(np.median(others)) if others else float("inf")
            if best > stall * typical:
                problems.append(f"best {_fmt(best)} never gets below {_fmt(stall * typical)}"
                                f" ({stall:g}x the median best of the arm's other seeds, "
                                f"{_fmt(typical)})")
            out.append(Health(arm, int(seed), best, float(c.steps[i]), last, tuple(problems)))
    return out


def _without(per_seed: dict[int, Curve], seeds: set[int]) -> dict[int, Curve]:
    return {k: c for k, c in per_seed.items() if k not in seeds}


def health_section(curves: dict[str, dict[int, Curve]], checks: Sequence[Health],
                   rise: float = RISE, stall: float = STALL) -> str:
    """Markdown: the unhealthy runs by name, each with its whole curve."""
    bad = [h for h in checks if not h.ok]
    head = (f"A run is flagged when its last value is more than {100 * rise:.0f}% above its "
            f"own best, or when its best stays above {stall:g}x the median best of the "
            "other seeds of its arm. Flagged runs stay in the step table and the plot "
            "(dashed), and their seed is left out of the speed-up comparisons that involve them.")
    if not bad:
        return head + f"\n\nAll {len(checks)} runs are healthy."
    lines = [head, "", f"**{len(bad)} of {len(checks)} runs flagged:**", ""]
    for h in bad:
        c = curves[h.arm][h.seed]
        pts = ", ".join(f"{int(s)}: {_fmt(v)}" for s, v in zip(c.steps, c.values, strict=True))
        lines.append(f"- `{h.arm}` seed {h.seed}: {'; '.join(h.problems)}. Curve: {pts}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Speed-up.


def steps_to_reach(curve: Curve, level: float) -> Reach:
    """The first step at which `curve` is at or below `level`, interpolated linearly.

    Between the last evaluated step above the level and the first one at or below it,
    the curve is taken as a straight line. A curve already at or below the level at its
    first evaluated step gives that step, marked `censored`.

    Example: steps (0, 100, 200), values (10, 6, 2), level 4 -> step 150.
    """
    s, v = curve.steps, curve.values
    below = np.nonzero(v <= level)[0]
    if len(below) == 0:
        return Reach(None)
    i = int(below[0])
    if i == 0:
        return Reach(float(s[0]), censored=True)
    frac = (v[i - 1] - level) / (v[i - 1] - v[i])  # v[i-1] > level >= v[i]
    return Reach(float(s[i - 1] + frac * (s[i] - s[i - 1])))


def default_levels(vanilla: Curve, max_levels: int = 6) -> list[tuple[float, float]]:
    """Quality levels from vanilla's seed-mean curve: (level, step it is first reached).

    The running minimum of the curve after its first evaluated step, with repeats and
    levels not below the first value dropped, thinned to at most `max_levels` evenly
    spaced ones (the best level, which vanilla reaches last, is always kept).
    """
    v = np.minimum.accumulate(vanilla.values)
    levels: list[tuple[float, float]] = []
    for i in range(1, len(v)):
        if v[i] < vanilla.values[0] and (not levels or v[i] < levels[-1][0]):
            levels.append((float(v[i]), float(vanilla.steps[i])))
    if len(levels) > max_levels:
        keep = np.unique(np.round(np.linspace(0, len(levels) - 1, max_levels)).astype(int))
        levels = [levels[k] for k in keep]
    return levels


def _pair_bound(rv: Reach, ra: Reach) -> tuple[str, float | None] | None:
    """The bound that a pair's ratio is, when both runs reach the level but one or both
    only by their first evaluated step (see `speedups`); None for an exact ratio."""
    assert rv.step is not None and ra.step is not None
    if rv.censored and ra.censored:
        return "?", None  # both steps are upper bounds: the ratio could be anything
    if ra.censored:  # the arm's true step is at most ra.step: the ratio is at least ...
        return "≥", rv.step / ra.step if ra.step else float("inf")
    if rv.censored:  # vanilla's true step is at most rv.step: the ratio is at most ...
        return "≤", rv.step / ra.step
    return None


def speedups(vanilla: dict[int, Curve], arm: dict[int, Curve], level: float) -> dict:
    """Speed-up of `arm` over `vanilla` at `level`, on seed means and per seed pair.

    Seeds are paired by their number (same seed = same initialisation and data order in
    every arm). A pair's ratio (vanilla's steps / the arm's) is exact only when both runs
    cross the level between two evaluated steps. Otherwise:
    - the arm is already at or below the level at its first evaluated step (its `Reach`
      is censored: the true step is at most that step): the ratio is a lower bound,
      '≥' (infinite when that step is 0);
    - vanilla is: the ratio is an upper bound, '≤';
    - both are: both steps are upper bounds and the ratio is unconstrained: '?', no
      number;
    - either run never reaches the level in its evaluated steps: the pair is counted in
      'arm_missed' / 'vanilla_missed' and gets no number (its true step lies past the
      last evaluated one, so the ratio is only bounded by where evaluation stopped).
    Bounds and missed pairs are left out of the per-seed mean, spread and geometric mean
    (`ratio_summary`); `_speedup_cell` names them. The seed-mean curves' ratio ('mean')
    follows the same rule, marked by 'mean_vanilla' / 'mean_arm' being censored.

    Returns:
      {'mean_vanilla': Reach, 'mean_arm': Reach, 'mean': float | None (ratio of the
      seed-mean curves' steps), 'pairs': {seed: float | None} (the ratio of the two
      reached steps, bounds included; None when a side misses the level or the arm is
      there at step 0), 'exact': {seed: float} (the exact ratios), 'bounds': {seed:
      (marker, value | None)} (the pairs whose ratio is a bound, see above),
      'vanilla_missed': [seeds], 'arm_missed': [seeds], 'censored': bool (some ratio is a
      bound)}.
    """
    mv, ma = steps_to_reach(mean_curve(vanilla, common=True)[0], level), steps_to_reach(
        mean_curve(arm, common=True)[0], level)
    out: dict = {"mean_vanilla": mv, "mean_arm": ma, "pairs": {}, "exact": {}, "bounds": {},
                 "vanilla_missed": [], "arm_missed": [],
                 "censored": bool(mv.censored or ma.censored)}
    out["mean"] = (mv.step / ma.step if mv.step is not None and ma.step
                   else None)
    for seed in sorted(set(vanilla) & set(arm)):
        rv, ra = steps_to_reach(vanilla[seed], level), steps_to_reach(arm[seed], level)
        if rv.step is None:
            out["vanilla_missed"].append(seed)
        if ra.step is None:
            out["arm_missed"].append(seed)
        ok = rv.step is not None and ra.step
        out["pairs"][seed] = rv.step / ra.step if ok else None
        if rv.step is None or ra.step is None:
            continue
        if (bound := _pair_bound(rv, ra)) is not None:
            out["bounds"][seed] = bound
            out["censored"] = True
        else:
            out["exact"][seed] = rv.step / ra.step
    return out


def ratio_summary(sp: dict) -> dict:
    """The per-seed ratios of a `speedups` result: the exact ones summarised, bounds apart.

    Ratios average geometrically (2x and 0.5x are 1x on the whole, not 1.25x), so the
    geometric mean exp(mean(log r)) stands beside the arithmetic one. Only exact ratios
    enter either mean, the std and the range. A result without 'exact' / 'bounds' keys
    (built by hand) counts every ratio in 'pairs' that is not None as exact.

    Returns:
      {'exact': {seed: ratio}, 'bounds': {seed: (marker, value | None)}, 'n_pairs': int
      (paired seeds, whatever their ratio), 'mean', 'std' (ddof 1; 0.0 for one ratio),
      'min', 'max', 'geomean': float, or None where no ratio is exact}.
    """
    bounds = dict(sp.get("bounds", {}))
    exact = dict(sp["exact"]) if "exact" in sp else {
        k: r for k, r in sp["pairs"].items() if r is not None and k not in bounds}
    r = np.array(list(exact.values()), dtype=float)
    have = r.size > 0
    return {"exact": exact, "bounds": bounds, "n_pairs": len(sp["pairs"]),
            "mean": float(np.mean(r)) if have else None,
            "std": (float(np.std(r, ddof=1)) if r.size > 1 else 0.0) if have else None,
            "min": float(np.min(r)) if have else None,
            "max": float(np.max(r)) if have else None,
            "geomean": float(np.exp(np.mean(np.log(r)))) if have else None}


# ----------------------------------------------------------------------------------------
# Output.


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"


def table(curves: dict[str, dict[int, Curve]]) -> str:
    """Markdown table: one row per evaluated step, one column per arm, mean ± std (n)."""
    arms = list(curves)
    stats = {a: mean_curve(curves[a]) for a in arms}
    steps = sorted({float(s) for a in arms for s in stats[a][0].steps})
    lines = ["| step | " + " | ".join(f"`{a}`" for a in arms) + " |",
             "|---:|" + "---:|" * len(arms)]
    for s in steps:
        cells = []
        for a in arms:
            mc, std, _, _, count = stats[a]
            hit = np.nonzero(mc.steps == s)[0]
            if len(hit) == 0:
                cells.append("–")
                continue
            i = int(hit[0])
            cells.append(f"{_fmt(mc.values[i])} ± {_fmt(std[i])} (n={count[i]})"
                         if count[i] > 1 else f"{_fmt(mc.values[i])} (n=1)")
        lines.append(f"| {int(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(vanilla: dict[int, Curve], arm: dict[int, Curve],
                       ) -> list[tuple[float, dict[int, float], float | None]]:
    """Per step both arms evaluated, the arm's value minus vanilla's for every seed that
    both have there, and the paired t statistic of those differences (mean / (sd /
    sqrt(n)), sd with ddof 1; None for fewer than two pairs or no spread).

    Seeds are paired by number: the same initialisation, data order and drawn noise.
    Returns [(step, {seed: difference}, t)] in step order, only steps with a pair.
    """
    steps = sorted({float(s) for c in vanilla.values() for s in c.steps})
    out = []
    for s in steps:
        diffs = {}
        for seed in sorted(set(vanilla) & set(arm)):
            v, a = vanilla[seed], arm[seed]
            if s in v.steps and s in a.steps:
                diffs[seed] = float(a.values[a.steps == s][0] - v.values[v.steps == s][0])
        if not diffs:
            continue
        d = np.array(list(diffs.values()))
        sd = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
        t = float(np.mean(d) / (sd / np.sqrt(len(d)))) if sd > 0 else None
        out.append((s, diffs, t))
    return out


def paired_table(curves: dict[str, dict[int, Curve]], baseline: str) -> str:
    """Markdown: per step, each arm's per-seed difference from vanilla and its paired t."""
    others = [a for a in curves if a != baseline]
    per_arm = {a: {s: (d, t) for s, d, t in paired_differences(curves[baseline], curves[a])}
               for a in others}
    steps = sorted({s for a in others for s in per_arm[a]})
    lines = ["| step | " + " | ".join(f"`{a}`: per seed (t)" for a in others) + " |",
             "|---:|" + "---:|" * len(others)]
    for s in steps:
        cells = []
        for a in others:
            if s not in per_arm[a]:
                cells.append("–")
                continue
            d, t = per_arm[a][s]
            vals = ", ".join(f"{k}: {v:+.3g}" for k, v in d.items())
            cells.append(vals + ("" if t is None else f" (t {t:+.2f})"))
        lines.append(f"| {int(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bound_text(seed: int, bound: tuple[str, float | None]) -> str:
    marker, value = bound
    if value is None:
        return f"seed {seed}: both there at their first evaluated step, no ratio"
    if value == float("inf"):
        return f"seed {seed} {marker} ∞ (the arm there at step 0)"
    return f"seed {seed} {marker} {value:.2f}"


def _speedup_cell(sp: dict) -> str:
    """One cell of the speed-up table: the seed-mean curves' ratio, then the per-seed
    exact ratios (mean ± std [min, max], k/n pairs; geometric mean), the bounds left out
    of them and the seeds that miss the level (see `speedups` for the rule)."""
    if sp["mean_vanilla"].step is None:
        return "vanilla does not reach it"
    bound_v, bound_a = sp["mean_vanilla"].censored, sp["mean_arm"].censored
    if sp["mean_arm"].step is None:
        head = "not reached"
    elif bound_v and bound_a:
        head = "both there at their first evaluated step"
    elif sp["mean"] is None:  # the arm's seed mean is there at step 0
        head = "≥ ∞× (the arm there at step 0)"
    else:  # a censored step is an upper bound of the true one
        head = ("≥ " if bound_a else "≤ " if bound_v else "") + f"{sp['mean']:.2f}×"
    summ = ratio_summary(sp)
    k, n, bounds = len(summ["exact"]), summ["n_pairs"], summ["bounds"]
    parts = []
    if k > 1:
        parts.append(f"per seed {summ['mean']:.2f} ± {summ['std']:.2f} "
                     f"[{summ['min']:.2f}, {summ['max']:.2f}], {k}/{n} pairs")
        parts.append(f"geometric mean {summ['geomean']:.2f}")
    elif k:
        parts.append(f"per seed {summ['mean']:.2f}, 1/{n} pairs")
    elif bounds:
        parts.append(f"per seed: no exact ratio, 0/{n} pairs")
    if bounds:
        parts.append((f"{len(bounds)} not exact, left out: " if k else "not exact: ")
                     + ", ".join(_bound_text(s, b) for s, b in sorted(bounds.items())))
    if sp["arm_missed"]:
        parts.append(f"not reached by seed(s) {', '.join(map(str, sp['arm_missed']))}")
    if sp["vanilla_missed"]:
        parts.append(f"vanilla seed(s) {', '.join(map(str, sp['vanilla_missed']))} "
                     "do not reach it")
    return head + (f" ({'; '.join(parts)})" if parts else "")


def left_out(checks: Sequence[Health], baseline: str, arm: str) -> list[int]:
    """Seeds whose pair (`baseline` vs `arm`) is left out of the speed-up: either run of
    the pair is unhealthy."""
    return sorted({h.seed for h in checks if not h.ok and h.arm in (baseline, arm)})


def speedup_table(curves: dict[str, dict[int, Curve]], baseline: str,
                  levels: Sequence[tuple[float, float | None]],
                  checks: Sequence[Health] = ()) -> str:
    """Markdown table of speed-ups over `baseline`, one row per level.

    Seeds in which either the baseline's or the arm's run is unhealthy (`checks`) are
    left out of that arm's comparison, on both sides (seeds are paired); a line under
    the table names them. The 'vanilla steps' column is vanilla's healthy runs.
    """
    others = [a for a in curves if a != baseline]
    drop = {a: set(left_out(checks, baseline, a)) for a in others}
    bad_base = {h.seed for h in checks if not h.ok and h.arm == baseline}
    base_ok = _without(curves[baseline], bad_base) or curves[baseline]
    lines = ["| level | vanilla steps (seed mean) | " + " | ".join(f"`{a}`" for a in others)
             + " |", "|---:|---:|" + "---:|" * len(others)]
    for level, _ in levels:
        cells = []
        for a in others:
            v, x = _without(curves[baseline], drop[a]), _without(curves[a], drop[a])
            cells.append(_speedup_cell(speedups(v, x, level)) if v and x
                         else "no healthy pair")
        rv = steps_to_reach(mean_curve(base_ok, common=True)[0], level)
        vs = "never" if rv.step is None else f"{rv.step:.0f}"
        lines.append(f"| {_fmt(level)} | {vs} | " + " | ".join(cells) + " |")
    notes = [f"`{a}`: seed(s) {', '.join(map(str, sorted(d)))} left out (an unhealthy run "
             "in the pair)" for a, d in drop.items() if d]
    if notes:
        lines += ["", "Pairs left out: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, Curve]], path: str, metric: str, sampler: str,
         title: str = "", checks: Sequence[Health] = ()) -> str:
    """Metric vs training step: the seed mean of each arm and its min-max band (log y-axis
    when the values span more than 5x); unhealthy runs (`checks`) dashed, by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm, per_seed in curves.items():
        mc, _, lo, hi, _ = mean_curve(per_seed)
        (line,) = ax.plot(mc.steps, mc.values, marker="o", ms=3,
                          label=f"{arm} ({len(per_seed)} seeds)")
        ax.fill_between(mc.steps, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        for h in checks:
            if h.arm == arm and not h.ok:
                c = per_seed[h.seed]
                ax.plot(c.steps, c.values, ls="--", lw=1, color=line.get_color(),
                        label=f"{arm} seed {h.seed} (flagged)")
    vals = np.concatenate([c.values for per_seed in curves.values() for c in per_seed.values()])
    if vals.size and vals.min() > 0 and vals.max() / vals.min() > 5:
        ax.set_yscale("log")  # early values dwarf the differences that matter late
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric} ({sampler}; lower is better)")
    ax.set_title(title or f"{metric} vs steps: mean and min-max over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pick_metric(rows: Sequence[dict]) -> str:
    metrics = sorted({r.get("metric") for r in rows if r.get("metric")})
    if not metrics:
        raise ValueError("no rows with a 'metric' field")
    return "fid" if "fid" in metrics else metrics[0]


def write_report(root: str, metric: str | None = None, sampler: str = "1step",
                 baseline: str | None = None, levels: Sequence[float] | None = None,
                 max_levels: int = 6, out_dir: str | None = None, rise: float = RISE,
                 stall: float = STALL, n: int | None = None,
                 ) -> tuple[str, str, list[Health]]:
    """Writes `report.md` and `curves.png` of a sweep root; returns their paths and the
    health of every run.

    Args:
      root: the sweep root.
      metric: row field to report ('fid', 'fd_pixels'; default: the rows' metric).
      sampler: '1step' or '2step'.
      baseline: the vanilla arm (default: the arm named 'assignment.method=none', else
        the first arm containing it).
      levels: quality levels of the speed-up (default: `default_levels` of vanilla).
      max_levels: at most this many default levels.
      out_dir: where to write (default: `root`).
      rise, stall: the health check's thresholds (see `health`).
      n: use the rows of this sample count (needed when the rows have several).

    Raises:
      ValueError: no rows, no rows of this metric/sampler (and n), rows evaluated with
        different settings, or no baseline arm.
    """
    rows = load_rows(root)
    if not rows:
        raise ValueError(f"no eval rows under {root} (run the sweep with evaluation first)")
    metric = metric or _pick_metric(rows)
    curves = arm_curves(rows, metric, sampler, n)
    if not curves:
        raise ValueError(f"no rows with {metric!r} for sampler {sampler!r}"
                         + ("" if n is None else f" and n={n}") + f" under {root}")
    used = next(setting(r) for r in rows if r.get("sampler") == sampler
                and r.get(metric) is not None and (n is None or r.get("n") == n))
    if baseline is None:
        cands = [a for a in curves if a == VANILLA] or [a for a in curves if VANILLA in a]
        baseline = cands[0] if cands else None
    if baseline not in curves:
        raise ValueError(f"no baseline arm {baseline!r}; arms: {list(curves)} "
                         "(pass --baseline)")
    curves = {baseline: curves[baseline], **{a: c for a, c in curves.items() if a != baseline}}
    out_dir = out_dir or root
    os.makedirs(out_dir, exist_ok=True)
    checks = health(curves, rise, stall)
    png = plot(curves, os.path.join(out_dir, PLOT), metric, sampler, checks=checks)
    bad_base = {h.seed for h in checks if not h.ok and h.arm == baseline}
    base_mean = mean_curve(_without(curves[baseline], bad_base) or curves[baseline],
                           common=True)[0]
    lv = ([(float(x), None) for x in levels] if levels
          else default_levels(base_mean, max_levels))
    n_seeds = {a: len(c) for a, c in curves.items()}
    md = [f"# Sweep report: `{root}`", "",
          f"Metric `{metric}` (lower is better), sampler `{sampler}` ({_describe(used)}"
          "); seeds per arm: "
          + ", ".join(f"`{a}` {n}" for a, n in n_seeds.items()) + ".", "",
          f"![{metric} vs steps]({PLOT})", "",
          "Curves: seed mean, band = min-max over seeds.", "",
          f"## {metric} at each evaluated step (mean ± std over seeds)", "", table(curves), "",
          "## Run health", "", health_section(curves, checks, rise, stall), "",
          "## Relaunches with changed settings", "",
          *(relaunches(root) or ["None: every run kept the settings it started with."]),
          "",
          f"## Per seed pair: arm minus `{baseline}` (negative: the arm is lower)", "",
          "Seeds are paired (same initialisation, data order and noise); t = mean / (sd "
          "/ sqrt(n)) of the differences, ddof 1, a paired t statistic per step (the "
          "steps come from the same runs and are not independent tests).", "",
          paired_table(curves, baseline) if len(curves) > 1 else "Only one arm.", "",
          f"## Speed-up over `{baseline}`", "",
          "Speed-up at a level = steps vanilla needs to reach it / steps the arm needs, "
          "each read off a curve by linear interpolation between evaluated steps. The "
          "headline number uses the seed-mean curves; 'per seed' pairs runs of the same "
          "seed (same initialisation and data order) and gives mean ± std [min, max] of "
          "those ratios that are exact, how many pairs that is, and their geometric mean "
          "(ratios average geometrically: 2× and 0.5× give 1×). 'not reached': the arm "
          "never gets to the level in the evaluated steps. '≥': the arm is already there "
          "at its first evaluated step, so the ratio is a lower bound; '≤': vanilla is, so "
          "it is an upper bound; both: no ratio. Per-seed bounds are named and left out "
          "of the per-seed mean, spread and geometric mean, as are seeds that miss the "
          "level."
          + ("" if levels else " Levels: vanilla's running-best seed-mean value at its "
             "evaluated steps (the last is the best level vanilla reaches)."), ""]
    if not lv:
        md.append("No level to compare at: vanilla's mean curve never improves on its first "
                  "evaluated value.")
    elif len(curves) < 2:
        md.append("Only one arm: nothing to compare.")
    else:
        md.append(speedup_table(curves, baseline, lv, checks))
        if uneven := uneven_steps(curves):
            md += ["", "The seed-mean speed-ups read only the steps every seed of an arm "
                   "evaluated; left out: " + "; ".join(
                       f"`{a}` step(s) {', '.join(f'{x:g}' for x in st)}"
                       for a, st in uneven.items()) + " (not evaluated by every seed)."]
    path = os.path.join(out_dir, REPORT)
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path, png, checks


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="sweep root")
    p.add_argument("--metric", default=None, help="fid | fd_pixels (default: the rows')")
    p.add_argument("--sampler", default="1step", help="1step | 2step")
    p.add_argument("--n", type=int, default=None,
                   help="the rows of this sample count (when rows were evaluated with several)")
    p.add_argument("--baseline", default=None, help=f"vanilla arm (default: {VANILLA})")
    p.add_argument("--levels", default="",
                   help="comma-separated quality levels (default: from vanilla's curve)")
    p.add_argument("--max-levels", type=int, default=6)
    p.add_argument("--out", default=None, help="output folder (default: --root)")
    p.add_argument("--rise", type=float, default=RISE,
                   help="flag runs ending more than this fraction above their best")
    p.add_argument("--stall", type=float, default=STALL,
                   help="flag runs whose best exceeds this multiple of the median best")
    args = p.parse_args(argv)
    levels = [float(x) for x in args.levels.split(",") if x.strip()] or None
    try:
        md, png, checks = write_report(args.root, args.metric, args.sampler, args.baseline,
                                       levels, args.max_levels, args.out, args.rise,
                                       args.stall, args.n)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {md} and {png}")
    for h in checks:
        if not h.ok:
            print(f"unhealthy run: {h.arm} seed {h.seed}: {'; '.join(h.problems)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
