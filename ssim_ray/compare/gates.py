"""The comparison's gates and their exit code: a candidate passes when no gate it is held to fails.

Semantics (per metric; the `group_` variants apply the same test to every group):

- `compare.max_mean_drop.<metric>` = d: violated when the mean delta (candidate − baseline, finite deltas)
  is below −d. The point estimate, not the interval: a gate is a tolerance the user chose, the verdict
  says whether a change is significant.
- `compare.max_fraction_worse.<metric>` = f: violated when the pairs worse by more than
  `compare.epsilon.<metric>` (a PSNR that stopped being +inf included) exceed f of the paired pairs.
- A metric or group with no paired pair violates a gate set on it: no change can be shown to be small.
- `compare.max_newly_failed` = n: more than n pairs are ok in the baseline and not ok in the candidate.
- `compare.max_unmatched` = n: more than n pairs are in one run only.

Exit code: EXIT_COMPARE_GATE = 6 for any violated gate, apart from the audit's 3, 4 and 5
(`ssim_ray.output.gates`) so that a pipeline running both tells them apart; 1 stays an error that stopped
the comparison (a refused one included), 0 every gate passed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from ssim_ray.compare.config import CompareConfig
from ssim_ray.compare.metrics import METRICS
from ssim_ray.output.gates import EXIT_FAILURE_GATE, EXIT_INCOMPLETE, EXIT_OK, EXIT_QUALITY_GATE, GateViolation

EXIT_COMPARE_GATE = 6
if EXIT_COMPARE_GATE in (EXIT_OK, 1, 2, EXIT_QUALITY_GATE, EXIT_FAILURE_GATE, EXIT_INCOMPLETE):
    raise ImportError("EXIT_COMPARE_GATE must differ from the audit's exit codes")


def _where(group: Optional[str]) -> str:
    return "overall" if group is None else f"in group {group!r}"


def _mean_drop(metric: str, stats: Mapping[str, Any], limit: float, group: Optional[str],
               setting: str) -> Optional[GateViolation]:
    spec = METRICS[metric]
    gate = f"{setting}.{metric}"
    if stats["mean"] is None:
        return GateViolation(gate, group, float("nan"), limit, EXIT_COMPARE_GATE,
                             f"compare.{gate}={limit:g}: no finite paired delta {_where(group)}, so the drop cannot "
                             "be shown to be small")
    if stats["mean"] >= -limit:
        return None
    return GateViolation(gate, group, stats["mean"], -limit, EXIT_COMPARE_GATE,
                         f"compare.{gate}={limit:g}: mean {spec.label} delta {_where(group)} is "
                         f"{stats['mean']:+.{spec.digits + 2}f}{spec.unit} over {stats['finite']:,} pairs, "
                         f"below −{limit:g}")


def _fraction_worse(metric: str, stats: Mapping[str, Any], limit: float, epsilon: float, group: Optional[str],
                    setting: str) -> Optional[GateViolation]:
    spec = METRICS[metric]
    gate = f"{setting}.{metric}"
    worse = stats["worse"]
    if not stats["paired"]:
        return GateViolation(gate, group, float("nan"), limit, EXIT_COMPARE_GATE,
                             f"compare.{gate}={limit:g}: no paired pair {_where(group)}, so the fraction worse "
                             "cannot be shown")
    if worse["fraction"] <= limit:
        return None
    return GateViolation(gate, group, worse["fraction"], limit, EXIT_COMPARE_GATE,
                         f"compare.{gate}={limit:g}: {worse['count']:,} of {stats['paired']:,} pairs "
                         f"{_where(group)} ({100 * worse['fraction']:.2f}%) are worse by more than "
                         f"ε={epsilon:g}{spec.unit} in {spec.label}, at most {100 * limit:.2f}% allowed")


def _metric_violations(metric: str, result: Mapping[str, Any], cfg: CompareConfig) -> List[GateViolation]:
    found: List[Optional[GateViolation]] = []
    scopes = [(None, result["overall"], cfg.max_mean_drop, cfg.max_fraction_worse, "max_mean_drop",
               "max_fraction_worse")]
    scopes += [(name, stats, cfg.group_max_mean_drop, cfg.group_max_fraction_worse, "group_max_mean_drop",
                "group_max_fraction_worse") for name, stats in result["groups"].items()]
    for group, stats, drops, fractions, drop_name, fraction_name in scopes:
        if drops.get(metric) is not None:
            found.append(_mean_drop(metric, stats, drops[metric], group, drop_name))
        if fractions.get(metric) is not None:
            found.append(_fraction_worse(metric, stats, fractions[metric], cfg.epsilon[metric], group, fraction_name))
    return [v for v in found if v is not None]


def evaluate_compare_gates(results: Mapping[str, Mapping[str, Any]], pairs: Mapping[str, Any],
                           cfg: CompareConfig) -> List[GateViolation]:
    """The gates of `cfg` that a comparison violates (empty: the candidate passes).

    Args:
        results: compare.json's "results": per metric, "overall" and "groups" statistics.
        pairs: compare.json's "pairs": counts per pairing outcome.
        cfg: the gates (see the module docstring).

    Returns:
        The violations: per metric overall then per group, then newly failed, then unmatched.

    Example:
        >>> stats = {"mean": -0.02, "finite": 10, "paired": 10, "worse": {"count": 4, "fraction": 0.4}}
        >>> cfg = CompareConfig(max_mean_drop={"ssim": 0.01})
        >>> [v.exit_code for v in evaluate_compare_gates({"ssim": {"overall": stats, "groups": {}}}, {}, cfg)]
        [6]
    """
    found: List[GateViolation] = []
    for metric, result in results.items():
        found.extend(_metric_violations(metric, result, cfg))
    counts: Dict[str, int] = {"newly_failed": pairs.get("newly_failed", 0),
                              "unmatched": pairs.get("baseline_only", 0) + pairs.get("candidate_only", 0)}
    for gate, what in (("max_newly_failed", "are ok in the baseline and not ok in the candidate"),
                       ("max_unmatched", "are in one run only")):
        limit, observed = getattr(cfg, gate), counts[gate.removeprefix("max_")]
        if limit is not None and observed > limit:
            found.append(GateViolation(gate, None, float(observed), float(limit), EXIT_COMPARE_GATE,
                                       f"compare.{gate}={limit}: {observed:,} pairs {what}"))
    return found
