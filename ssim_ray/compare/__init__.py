"""Compare two audits pair by pair: did the candidate get worse, where, by how much, and does it pass.

`compare_runs(CompareJobConfig(baseline=<output.url>, candidate=<output.url>), output_url=...)` pairs the rows
of the two runs' ssim.parquet by pair_id (`join`: one pass when they share a plan, hash partitions on disk
otherwise), writes every pair_id of either run to compare.parquet (`rows`), keeps counts, extremes and
samples in memory and the deltas on local disk (`accumulate`, `spill`: memory does not grow with the rows),
computes per metric and group the mean delta with a bootstrap interval, percentiles,
fractions worse and the extremes (`statistics`), applies the gates (`gates`: exit code 6) and writes
compare.json and compare.html (`report`, `sections`, `charts`, `panels`). The job is `jobs/compare.py`.

Layering: this package reads audits' outputs; it never imports the audit job (run, dispatch, placement,
worker, batching), and nothing of the audit imports it.
"""

from ssim_ray.compare.config import CompareConfig, CompareJobConfig, register_compare_configs
from ssim_ray.compare.gates import EXIT_COMPARE_GATE, evaluate_compare_gates
from ssim_ray.compare.run import COMPARE_HTML, COMPARE_JSON, COMPARE_PARQUET, CompareOutcome, compare_runs
from ssim_ray.compare.runs import CompareRefusedError

__all__ = [
    "COMPARE_HTML", "COMPARE_JSON", "COMPARE_PARQUET", "CompareConfig", "CompareJobConfig", "CompareOutcome",
    "CompareRefusedError", "EXIT_COMPARE_GATE", "compare_runs", "evaluate_compare_gates", "register_compare_configs",
]
