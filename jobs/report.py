"""Re-make the audit report of an existing output: `python -m jobs.report <output_url> [options]`.

Reads summary.json (and _run.json, to re-read the worst pairs) under the output and writes report.html and
plots/ beside them. With --check-gates it also exits with the quality-gate code of the gates the run was
merged with (see ssim_ray/output/gates.py: 3 quality, 4 failures, 5 incomplete), so a pipeline can re-check an
existing audit without recomputing it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ssim_ray.config import AuditConfig, ReportConfig
from ssim_ray.output.gates import evaluate_gates, exit_code
from ssim_ray.output.layout import SUMMARY_FILE, output_filesystem
from ssim_ray.report import make_report


def _arguments(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.splitlines()[0])
    parser.add_argument("output_url", help="the audit's output folder (any fsspec URL)")
    parser.add_argument("--worst-k", type=int, default=ReportConfig().worst_k,
                        help="worst pairs shown with images (at most the summary's worst_k)")
    parser.add_argument("--storage-options", default="{}",
                        help="fsspec options for the output as JSON, e.g. an endpoint; never credentials")
    parser.add_argument("--check-gates", action="store_true",
                        help="exit with the gates' code (3, 4 or 5) when the summary violates them")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Make the report; return the process exit code.

    Example:
        >>> main(["/data/audit", "--check-gates"])  # doctest: +SKIP
        0
    """
    args = _arguments(argv)
    storage_options = json.loads(args.storage_options)
    result = make_report(args.output_url, report_cfg=ReportConfig(worst_k=args.worst_k),
                         storage_options=storage_options)
    print(f"report: {result.html_path} ({len(result.plot_paths)} plots, "
          f"{result.worst_with_images}/{result.worst_shown} worst pairs with images, {result.seconds:.2f} s)")
    if not args.check_gates:
        return 0
    fs, root = output_filesystem(args.output_url, storage_options)
    summary = json.loads(fs.cat_file(f"{root}/{SUMMARY_FILE}"))
    violations = evaluate_gates(summary, AuditConfig(**(summary.get("audit") or {})))
    for violation in violations:
        print(f"gate violated: {violation.message}", file=sys.stderr)
    return exit_code(violations)


def console() -> None:
    """The `ssim-report` command (pyproject.toml [project.scripts]): main() with the process's arguments."""
    sys.exit(main())


if __name__ == "__main__":
    console()
