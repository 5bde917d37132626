"""The HTML audit report and its plots, made from summary.json. Never imports the job.

Modules: `make` (make_report: files in, files out), `page` (the document, style, script, CSP), `findings`
(the opening section), `sections` (the others), `markup` (number spans, tables), `charts` (matplotlib
figures, the SSIM-map colormap), `bins` (histogram arithmetic on the summary's bins), `worst` (re-reading,
re-scoring and drawing the worst pairs).

Example:
    >>> from ssim_ray.report import make_report
    >>> make_report("/data/audit", report_cfg=ReportConfig())  # doctest: +SKIP
"""

from ssim_ray.report.make import PLOTS_DIR, REPORT_FILE, ReportResult, make_report

__all__ = ["PLOTS_DIR", "REPORT_FILE", "ReportResult", "make_report"]
