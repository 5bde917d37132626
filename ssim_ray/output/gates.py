"""Quality gates: decide from summary.json whether an audit passes, and with which exit code it fails.

Semantics (exact counts, not histogram estimates: `merge.merge(..., audit_cfg=...)` writes the number of
ok pairs strictly below each gate's threshold into the summary's `below` entries):

- `audit.min_ssim` = t with `audit.max_fraction_below` = f (unset: f = 0): violated when
  (ok pairs with ssim < t) / (ok pairs) > f. So with f unset, one ok pair below t violates it; a pair
  exactly at t passes. With no ok pair at all the gate is violated too: quality that cannot be measured
  is not shown to be good.
- `audit.group_min_ssim` / `audit.group_max_fraction_below`: the same test for every value of
  `summary.group_by` (null values form the group "(null)"), one violation per failing group. A group
  with rows but no ok pair violates it, like the whole run.
- `audit.min_psnr` (dB) and `audit.min_ms_ssim`, with `audit.psnr_max_fraction_below` /
  `audit.ms_ssim_max_fraction_below` and their `group_` variants: the same tests on PSNR and MS-SSIM (each
  needs its metric in `metrics`). A PSNR of +inf (identical images) is never below. MS-SSIM judges the ok
  pairs that have a value plus those whose value is undefined because a scale's term is <= 0
  (`nonpositive_term`, counted below every threshold: the images share no structure at that scale); pairs
  too small for five scales (`too_small`) are not measured and left out. No pair to judge violates the gate.
- `audit.max_failures` = n: violated when the rows whose status is not `ok` number more than n.
- No ok pair at all (an empty manifest, or every pair failed): violated whatever gates are set, with the
  failure gate's code, unless `audit.allow_no_ok_pairs` is true. An audit that measured nothing has not
  shown anything, and its summary would otherwise exit 0 like a clean one.
- A summary flagged `"complete": false` (a merge with missing shards) is a violation of its own.

Exit codes (the job exits with the highest one present; every violation is printed):
EXIT_OK = 0, EXIT_QUALITY_GATE = 3 (the score gates), EXIT_FAILURE_GATE = 4 (max_failures, no ok
pair), EXIT_INCOMPLETE = 5 (missing shards). 1 and 2 stay with Python (uncaught exception) and argument errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

from ssim_ray.config import METRIC_LABELS, AuditConfig, ScoreGate

EXIT_OK = 0
EXIT_QUALITY_GATE = 3
EXIT_FAILURE_GATE = 4
EXIT_INCOMPLETE = 5


@dataclass(frozen=True)
class GateViolation:
    """One failed gate: which, for which group (None: the whole run), what was measured, the limit."""

    gate: str
    group: Optional[str]
    observed: float
    limit: float
    exit_code: int
    message: str


# What a gate judges: every ok pair, or for MS-SSIM those with a value or a nonpositive term (not too_small).
_JUDGED = {"ssim": "ok pair", "psnr": "ok pair", "ms_ssim": "ok pair judged by MS-SSIM"}


def _below_entry(summary: Mapping[str, Any], threshold: float, gate: str, metric: str = "ssim") -> Mapping[str, Any]:
    # Entries written before other metrics had gates carry no "metric": they are SSIM's.
    for entry in summary.get("below", []):
        if entry.get("metric", "ssim") == metric and entry["threshold"] == threshold:
            return entry
    have = [(e.get("metric", "ssim"), e["threshold"]) for e in summary.get("below", [])]
    raise ValueError(
        f"audit.{gate}={threshold} needs the summary's count of ok pairs below {threshold} in {metric}; the "
        f"summary has counts for {have}. Rebuild it with output.merge_only=true and this audit config."
    )


def _fraction_violation(gate: str, group: Optional[str], counts: Mapping[str, Any], threshold: float,
                        max_fraction: Optional[float], metric: str = "ssim") -> Optional[GateViolation]:
    limit = max_fraction if max_fraction is not None else 0.0
    where = f"group {group!r}" if group is not None else "the run"
    setting = f"audit.{gate}={threshold}" + (f", max fraction {max_fraction}" if max_fraction is not None else "")
    if not counts["ok"]:
        return GateViolation(gate, group, 1.0, limit, EXIT_QUALITY_GATE,
                             f"{setting}: {where} has no {_JUDGED[metric]}, so its quality cannot be shown")
    if counts["fraction"] <= limit:
        return None
    return GateViolation(
        gate, group, counts["fraction"], limit, EXIT_QUALITY_GATE,
        f"{setting}: {counts['count']} of {counts['ok']} {_JUDGED[metric].replace('pair', 'pairs', 1)} in {where} "
        f"({100 * counts['fraction']:.2f}%) have {METRIC_LABELS[metric]} below {threshold}, at most "
        f"{100 * limit:.2f}% allowed",
    )


def _gate_violations(summary: Mapping[str, Any], audit_cfg: AuditConfig, gate: ScoreGate) -> List[GateViolation]:
    """One score gate (`config.SCORE_GATES`) on the run, or on each group."""
    threshold, max_fraction = gate.threshold_of(audit_cfg), getattr(audit_cfg, gate.fraction)
    if not gate.per_group:
        counts = _below_entry(summary, threshold, gate.name, gate.metric)
        violation = _fraction_violation(gate.name, None, counts, threshold, max_fraction, gate.metric)
        return [violation] if violation else []
    if not summary.get("group_by"):
        raise ValueError(f"audit.{gate.name} needs summary.group_by to name a column, got summary.group_by=None")
    entry = _below_entry(summary, threshold, gate.name, gate.metric)
    found = []
    for group in summary["groups"]:
        counts = entry["groups"].get(group, {"count": 0, "ok": 0, "fraction": None})
        violation = _fraction_violation(gate.name, group, counts, threshold, max_fraction, gate.metric)
        if violation:
            found.append(violation)
    return found


def evaluate_gates(summary: Mapping[str, Any], audit_cfg: AuditConfig) -> List[GateViolation]:
    """The gates of `audit_cfg` that `summary` violates (empty: the audit passes).

    Args:
        summary: summary.json as `merge.merge(..., audit_cfg=audit_cfg)` returns or wrote it.
        audit_cfg: the gates (see the module docstring for their exact semantics).

    Returns:
        The violations, in gate order: complete, min_ssim, group_min_ssim per group, min_psnr,
        group_min_psnr per group, min_ms_ssim, group_min_ms_ssim per group, max_failures, no_ok_pairs.

    Raises:
        ValueError: a gate needs a count the summary lacks (made without this audit config) or a
            group gate is set without summary.group_by.

    Example:
        >>> summary = {"complete": True, "pairs": {"failures": 2}, "below": []}
        >>> [v.exit_code for v in evaluate_gates(summary, AuditConfig(max_failures=1))]
        [4]
    """
    found: List[GateViolation] = []
    if summary.get("complete") is False:
        missing = summary.get("shards", {}).get("missing")
        found.append(GateViolation("complete", None, float(missing or 0), 0.0, EXIT_INCOMPLETE,
                                   f"the summary is incomplete: {missing} planned shards were not merged"))
    for gate in audit_cfg.set_gates():
        found.extend(_gate_violations(summary, audit_cfg, gate))
    failures = summary["pairs"]["failures"]
    if audit_cfg.max_failures is not None and failures > audit_cfg.max_failures:
        found.append(GateViolation("max_failures", None, float(failures), float(audit_cfg.max_failures),
                                   EXIT_FAILURE_GATE,
                                   f"audit.max_failures={audit_cfg.max_failures}: {failures} pairs are not ok"))
    found.extend(_no_ok_pairs(summary, audit_cfg))
    return found


def _no_ok_pairs(summary: Mapping[str, Any], audit_cfg: AuditConfig) -> List[GateViolation]:
    pairs = summary["pairs"]
    # A summary without the ok count (written before it existed) is not judged on it.
    if audit_cfg.allow_no_ok_pairs or pairs.get("ok") is None or pairs["ok"] > 0:
        return []
    merged = pairs.get("merged", pairs.get("failures", 0))
    why = "the plan has no pair" if not merged else f"{merged} pairs, all failed"
    return [GateViolation("no_ok_pairs", None, 0.0, 1.0, EXIT_FAILURE_GATE,
                          f"no pair is ok ({why}): nothing was measured; set audit.allow_no_ok_pairs=true "
                          "if that is expected")]


def exit_code(violations: Sequence[GateViolation]) -> int:
    """The process exit code for these violations: EXIT_OK, or the highest code among them.

    Example:
        >>> exit_code([])
        0
    """
    return max((v.exit_code for v in violations), default=EXIT_OK)
