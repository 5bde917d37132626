"""The audit job: `python -m jobs.ssim_audit [overrides]`. Converts the config once, runs, reports."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ssim_ray.config import AuditJobConfig, register_configs
from ssim_ray.run import evaluate, merge_only, print_summary

register_configs()


# The configs are the repository's conf/, installed as the package ssim_ray_conf (pyproject.toml), so the
# job finds them from any folder, installed or editable.
@hydra.main(version_base=None, config_path="pkg://ssim_ray_conf", config_name="ssim_audit")
def main(cfg: DictConfig) -> None:
    job: AuditJobConfig = OmegaConf.to_object(cfg)
    outcome = merge_only(job, output_url=job.output.url) if job.output.merge_only else evaluate(
        job, output_url=job.output.url
    )
    print_summary(outcome)
    if outcome.exit_code:
        sys.exit(outcome.exit_code)


if __name__ == "__main__":
    main()
