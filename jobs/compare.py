"""Compare two audits: `python -m jobs.compare baseline=<output.url> candidate=<output.url> [overrides]`.

Converts the config once, calls `ssim_ray.compare.compare_runs`, prints the verdict and exits with the
comparison's code: 0 every gate passed, 6 a comparison gate failed, 1 the comparison was refused or failed.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ssim_ray.compare import (
    CompareJobConfig,
    CompareOutcome,
    CompareRefusedError,
    compare_runs,
    register_compare_configs,
)
from ssim_ray.secrets import literal_secrets

register_compare_configs()


def check_before_saving(config: DictConfig) -> None:
    """Refuse literal credentials in the config or on the command line, and invalid values, before Hydra
    writes them into its run folder (as jobs/callbacks.py does for the audit).

    Raises:
        ValueError: naming where a credential was given, or the first value that does not validate.
    """
    task = OmegaConf.to_container(config, resolve=False)
    hydra_section = task.pop("hydra", None) or {}
    overrides = ((hydra_section.get("overrides") or {}).get("task")) or []
    found = literal_secrets(task) + [f"command line '{o.split('=', 1)[0]}'" for o in overrides
                                     if literal_secrets({o.split("=", 1)[0].split(".")[-1]: o.split("=", 1)[-1]})]
    if found:
        raise ValueError(f"credentials found in {', '.join(dict.fromkeys(found))}: give them through the environment "
                         "or fsspec's own configuration (Hydra saves the config and command line in its run folder)")
    task.get("compare", {}).pop("output_url", None)  # ${hydra:...} resolves only once the run folder exists
    OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CompareJobConfig), task))


class RefuseSecretsBeforeSaving(Callback):
    """Registered in conf/compare.yaml under hydra.callbacks."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_before_saving(config)
        except ValueError as error:
            # Hydra turns a callback's exceptions into warnings and saves the config anyway: exit instead.
            print(f"Error: {error}", file=sys.stderr)
            raise SystemExit(1) from error


def print_outcome(outcome: CompareOutcome) -> None:
    """The verdict per metric, the pairing changes, the gates, and where the files are."""
    summary = outcome.summary
    for metric in summary["metrics"]:
        overall = summary["results"][metric]["overall"]
        regressed = [g for g, s in summary["results"][metric]["groups"].items() if s["verdict"] == "regressed"]
        mean = "–" if overall["mean"] is None else (
            f"{overall['mean']:+.6g} [{overall['ci_low']:+.6g}, {overall['ci_high']:+.6g}]")
        print(f"{metric}: {overall['verdict']}; mean delta {mean} over {overall['paired']:,} pairs"
              + (f"; regressed in {', '.join(regressed)}" if regressed else ""))
    pairs = summary["pairs"]
    print(f"pairs: {pairs['both_ok']:,} ok in both, {pairs['newly_failed']:,} newly failed, {pairs['fixed']:,} fixed, "
          f"{pairs['baseline_only']:,} baseline only, {pairs['candidate_only']:,} candidate only")
    for violation in outcome.violations:
        print(f"gate violated: {violation.message}", file=sys.stderr)
    print(f"compare: {outcome.output_url} (compare.parquet, compare.json"
          + (", compare.html)" if outcome.html_path else ")"))


@hydra.main(version_base=None, config_path="pkg://ssim_ray_conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    job: CompareJobConfig = OmegaConf.to_object(cfg)
    try:
        outcome = compare_runs(job)
    except CompareRefusedError as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)
    print_outcome(outcome)
    if outcome.exit_code:
        sys.exit(outcome.exit_code)


if __name__ == "__main__":
    main()
