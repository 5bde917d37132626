"""Hydra glue: refuse credentials and invalid settings before Hydra writes anything to the run folder.

Hydra saves the composed config (`.hydra/config.yaml`), its own config with the command line
(`.hydra/hydra.yaml`) and the overrides (`.hydra/overrides.yaml`) into the run folder before the job
function runs, so a check inside the job comes too late: a refused secret would already be on disk. This
callback runs at `on_run_start`, after composition and before any file is written.
"""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ssim_ray.config import AuditJobConfig
from ssim_ray.secrets import literal_secrets

_ADVICE = ("Hydra writes the config and the command line into the run folder, so credentials never go there: "
           "give a presigned or signed URL through an environment variable, e.g. source.url='${oc.env:SOURCE_URL}' "
           "(saved as written, resolved at run time), and storage credentials through the environment or "
           "fsspec's own configuration")


def check_before_saving(config: DictConfig) -> AuditJobConfig:
    """Refuse literal credentials anywhere in the config or on the command line, then validate every value.

    Args:
        config: the composed config, Hydra's section included.

    Returns:
        The validated AuditJobConfig (with `${hydra:...}` interpolations, which only resolve once the run
        folder exists, replaced by a placeholder).

    Raises:
        ValueError: a credential is given literally (naming where), or a value does not validate.
    """
    task = OmegaConf.to_container(config, resolve=False)
    hydra_section = task.pop("hydra", None) or {}
    overrides = ((hydra_section.get("overrides") or {}).get("task")) or []
    found = literal_secrets(task) + [f"command line '{o.split('=', 1)[0]}'" for o in overrides
                                     if literal_secrets({o.split("=", 1)[0].split(".")[-1]: o.split("=", 1)[-1]})]
    if found:
        raise ValueError(f"credentials found in {', '.join(dict.fromkeys(found))}: {_ADVICE}")
    schema = OmegaConf.structured(AuditJobConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, _without_hydra_interpolations(task)))


def _without_hydra_interpolations(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_hydra_interpolations(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_hydra_interpolations(item) for item in value]
    if isinstance(value, str) and "${hydra:" in value:
        return "<set when the run folder exists>"
    return value


def _stop_on_error(config: DictConfig) -> None:
    # Hydra turns a callback's exceptions into warnings and goes on to save the config: exit instead
    # (SystemExit is not an Exception, so it passes Hydra's handler), with the job's error exit code.
    try:
        check_before_saving(config)
    except ValueError as error:
        print(f"Error: {error}", file=sys.stderr)
        raise SystemExit(1) from error


class RefuseSecretsBeforeSaving(Callback):
    """Registered in conf/ssim_audit.yaml under hydra.callbacks."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _stop_on_error(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _stop_on_error(config)
