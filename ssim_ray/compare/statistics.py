"""Statistics of the paired deltas, overall and per group, and the verdict each one earns.

Per metric and group, over the pairs both runs scored: the mean delta with a bootstrap confidence interval,
the exact percentiles (numpy's linear method, as `output.summary_stats.percentiles_of`, found in the deltas
spilled to disk by `spill.order_statistics`: memory does not grow with the rows), the fractions worse
and better by more than ε, the pairs whose score became or stopped being infinite (PSNR of identical
images), the two runs' means (over the pairs both scored finitely), and the worst regressions and best improvements.

Mean, percentiles and bootstrap use the finite deltas; a delta of ±inf (a PSNR that became, or stopped
being, +inf) is counted apart and counts as worse (−inf) or better (+inf) by more than ε. Percentiles,
counts and the interval are the same whichever order the rows were joined in; the mean is a float64 sum in
join order (the aligned and partitioned joins agree to ~1e-16 relative).

The interval is a percentile bootstrap of the mean: `resamples` resamples (default 1000), each of
m = min(n, max_sample) deltas drawn with replacement (default cap 50,000) from the group's sample
(`accumulate.HashSample`: the sorted deltas of the m pairs with the smallest pair_id hashes, so all n of
them below the cap). Below the cap that is the ordinary bootstrap; above it, the m-out-of-n bootstrap
(Bickel, Götze and van Zwet 1997) of a uniform subsample, each resample mean's deviation from the sample's
mean scaled by √(m/n) and added to the mean of all n, which keeps the cost at resamples × m draws and the
memory at m deltas per group while the interval's width is that of n. Each metric and group draws from its
own generator, seeded from (`compare.seed`, metric, group), so a group's interval does not depend on which
other groups exist.

Verdict: "regressed" when the whole interval is below 0, "improved" when it is above 0, else "no
significant change"; "not measured" without a paired pair. With no finite delta at all (every paired
PSNR became or stopped being infinite) the larger of the two counts decides.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ssim_ray.compare.accumulate import MetricAccumulator
from ssim_ray.compare.spill import ALL, linear_positions, linear_value, order_statistics
from ssim_ray.output.summary_stats import PERCENTILES

REGRESSED, IMPROVED, NO_CHANGE, NOT_MEASURED = "regressed", "improved", "no significant change", "not measured"
VERDICTS = (REGRESSED, IMPROVED, NO_CHANGE, NOT_MEASURED)
# Indices drawn per step of the bootstrap: bounds its scratch memory (~32 MB of int64 and float64).
_DRAWS_PER_STEP = 2_000_000


def seed_for(seed: int, metric: str, group: Optional[str]) -> np.random.SeedSequence:
    """The seed of one metric's and group's resamples (None: overall), stable across processes.

    Example:
        >>> a = np.random.default_rng(seed_for(0, "ssim", "jpeg")).integers(1 << 30)
        >>> b = np.random.default_rng(seed_for(0, "ssim", "jpeg")).integers(1 << 30)
        >>> bool(a == b)
        True
    """
    where = [0] if group is None else [1, zlib.crc32(group.encode("utf-8"))]
    return np.random.SeedSequence([seed, zlib.crc32(metric.encode("utf-8")), *where])


def bootstrap_interval(values: np.ndarray, *, resamples: int, max_sample: int, confidence: float,
                       seed: np.random.SeedSequence, total: Optional[int] = None,
                       centre: Optional[float] = None) -> Tuple[Optional[float], Optional[float]]:
    """The percentile-bootstrap interval of the mean of `total` deltas (see the module docstring).

    Args:
        values: the deltas, or a uniform sample of them, in a fixed order (sorted), so that the same seed
            gives the same interval.
        resamples: bootstrap resamples.
        max_sample: at most this many draws per resample (m-out-of-n above it).
        confidence: e.g. 0.95.
        seed: the generator's seed (`seed_for`).
        total: how many deltas `values` stands for (default: `values.size`, all of them).
        centre: the mean of all `total` deltas (default: the mean of `values`).

    Returns:
        (low, high); (None, None) without values.

    Example:
        >>> x = np.sort(np.random.default_rng(1).normal(0.0, 1.0, 400))
        >>> low, high = bootstrap_interval(x, resamples=500, max_sample=1000, confidence=0.95,
        ...                                seed=seed_for(0, "t", None))
        >>> bool(low < x.mean() < high), round(high - low, 1)  # about 2 x 1.96 / sqrt(400)
        (True, 0.2)
    """
    held = values.size
    n = held if total is None else total
    if held == 0:
        return None, None
    m = min(held, max_sample)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, _DRAWS_PER_STEP // m)
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        means[start:start + count] = values[rng.integers(0, held, size=(count, m))].mean(axis=1)
    if m < n:
        middle = values.mean()
        means = (middle if centre is None else centre) + (means - middle) * math.sqrt(m / n)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def verdict(low: Optional[float], high: Optional[float], *, paired: int, became_finite: int,
            became_infinite: int) -> str:
    """The verdict of one metric and group (see the module docstring).

    Example:
        >>> verdict(-0.02, -0.01, paired=9, became_finite=0, became_infinite=0), verdict(0.0, 0.0, paired=9,
        ...     became_finite=0, became_infinite=0)
        ('regressed', 'no significant change')
    """
    if not paired:
        return NOT_MEASURED
    if low is None or high is None:
        if became_finite != became_infinite:
            return REGRESSED if became_finite > became_infinite else IMPROVED
        return NO_CHANGE
    if high < 0:
        return REGRESSED
    if low > 0:
        return IMPROVED
    return NO_CHANGE


def _fraction(count: int, total: int) -> Dict[str, Any]:
    return {"count": count, "fraction": count / total if total else None}


def delta_statistics(acc: MetricAccumulator, code: Optional[int], percentiles: Dict[str, Optional[float]], *,
                     resamples: int, max_sample: int, confidence: float,
                     seed: np.random.SeedSequence) -> Dict[str, Any]:
    """One metric's statistics over one group (`code`; None: overall), its exact percentiles given."""
    def count(name: str) -> int:
        return int(acc.counts.of(name, code) if code is not None else acc.counts.total(name))

    paired, finite = count("paired"), count("finite")
    total = acc.counts.of("sum_delta", code) if code is not None else acc.counts.total("sum_delta")
    mean = total / finite if finite else None
    low, high = bootstrap_interval(acc.bootstrap.values(code), resamples=resamples, max_sample=max_sample,
                                   confidence=confidence, seed=seed, total=finite, centre=mean)
    sums = [acc.counts.of(n, code) if code is not None else acc.counts.total(n)
            for n in ("sum_baseline", "sum_candidate")]
    scored = count("finite_scores")
    return {
        "verdict": verdict(low, high, paired=paired, became_finite=count("became_finite"),
                           became_infinite=count("became_infinite")),
        "paired": paired, "finite": finite,
        "mean": mean, "ci_low": low, "ci_high": high,
        "median": percentiles["p50"], "percentiles": percentiles,
        "worse": _fraction(count("worse"), paired), "better": _fraction(count("better"), paired),
        "unchanged": _fraction(count("unchanged"), paired),
        "became_infinite": count("became_infinite"), "became_finite": count("became_finite"),
        "baseline_mean": sums[0] / scored if scored else None, "candidate_mean": sums[1] / scored if scored else None,
        "scored_in_baseline_only": count("scored_in_baseline_only"),
        "scored_in_candidate_only": count("scored_in_candidate_only"),
        "worst": acc.worst.listed(code), "best": acc.best.listed(code),
    }


def exact_percentiles(acc: MetricAccumulator, codes: Sequence[int]) -> Dict[int, Dict[str, Optional[float]]]:
    """PERCENTILES of the finite deltas of each group code (`spill.ALL`: all of them), exact, as numpy's
    linear method, read from the spill in a few passes whatever the number of groups."""
    sizes = {code: int(acc.counts.of("finite", code)) for code in codes if code != ALL}
    sizes[ALL] = int(acc.counts.total("finite"))
    if sizes[ALL] != acc.size:  # a bug of this package, never of the data
        raise RuntimeError(f"{acc.metric}: {acc.size} finite deltas kept, {sizes[ALL]} counted")
    positions = {code: linear_positions(sizes[code], PERCENTILES) for code in codes if sizes[code]}
    wanted = {code: sorted({rank for low, high, _ in found for rank in (low, high)})
              for code, found in positions.items()}
    values = order_statistics(acc.spill, wanted, sizes) if wanted else {}
    results: Dict[int, Dict[str, Optional[float]]] = {}
    for code in codes:
        found = positions.get(code)
        results[code] = {f"p{q}": None if found is None else
                         linear_value(values[(code, low)], values[(code, high)], weight)
                         for q, (low, high, weight) in zip(PERCENTILES, found or [(0, 0, 0.0)] * len(PERCENTILES))}
    return results


def metric_statistics(acc: MetricAccumulator, group_names: List[str], *, seed: int, resamples: int,
                      max_sample: int, confidence: float) -> Dict[str, Any]:
    """One metric's statistics: overall, and per group sorted by mean delta (lowest first, unmeasured last).

    Memory: the groups' bootstrap samples and the bounded reads of `exact_percentiles`, not the rows.
    """
    options = {"resamples": resamples, "max_sample": max_sample, "confidence": confidence}
    percentiles = exact_percentiles(acc, [ALL, *range(len(group_names))])
    groups: Dict[str, Dict[str, Any]] = {}
    for code, name in enumerate(group_names):
        groups[name] = delta_statistics(acc, code, percentiles[code], seed=seed_for(seed, acc.metric, name),
                                        **options)
    overall = delta_statistics(acc, None, percentiles[ALL], seed=seed_for(seed, acc.metric, None), **options)
    ranked = sorted(groups, key=lambda g: (groups[g]["mean"] is None, groups[g]["mean"] or 0.0, g))
    return {"overall": overall, "groups": {name: groups[name] for name in ranked}}
