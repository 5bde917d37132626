"""The HTML audit report and its plots, made from summary.json. Never imports the job."""
