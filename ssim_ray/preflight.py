"""Pre-flight: the checks a run makes after planning and before it writes anything (run manifest, claim, shard).

Owns what can only be checked against the plan, and the config checked once more: every section's values and
the cross-section rules (`AuditJobConfig.validate`: a config may be changed after it was built), the
pass-through columns' types across the manifest's files (`sources.passthrough`), and `summary.group_by`
naming a column the results will have, of a type that groups (has a text form). A setting that would fail
only inside the actors, or in the merge after every shard, is refused here, so a corrected rerun does not
find a half-finished output recorded with the wrong settings.
"""

from __future__ import annotations

from typing import List

import pyarrow as pa

from ssim_ray import sources
from ssim_ray.config import AuditJobConfig
from ssim_ray.output.schema import RESULT_SCHEMA
from ssim_ray.sources.passthrough import passthrough_schema


def check_plan(cfg: AuditJobConfig, plan: sources.Plan) -> pa.Schema:
    """Refuse a config or plan that cannot work, before anything is written.

    Args:
        cfg: the job's config.
        plan: the plan made from `cfg.source`.

    Returns:
        The schema the results will have: the result columns, then the pass-through columns (unified).

    Raises:
        ValueError: a setting that cannot work (naming it and the value got), or `summary.group_by` naming
            a column the results will not have or cannot group on.
        sources.ManifestError: a pass-through column the results cannot hold, or types that differ across
            the manifest's files and cannot be unified.

    Example:
        >>> from ssim_ray.sources import Plan
        >>> cfg = AuditJobConfig()
        >>> cfg.summary.group_by = "codec"
        >>> check_plan(cfg, Plan(shards=(), fingerprint="f", total_pairs=0, passthrough_columns=()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: summary.group_by='codec' is not a column of the results; they have pair_id, reference, ...
    """
    cfg.validate()
    passthrough = passthrough_schema(_manifest_files(cfg, plan), plan.passthrough_columns, cfg=cfg.source)
    results = pa.schema(list(RESULT_SCHEMA) + [f for f in passthrough if f.name not in RESULT_SCHEMA.names])
    _check_group_by(cfg.summary.group_by, results)
    return results


def _manifest_files(cfg: AuditJobConfig, plan: sources.Plan) -> List[str]:
    """The manifest files the plan reads, in plan order, each once (none for a prefix source)."""
    urls: List[str] = []
    for shard in plan.shards:
        if not isinstance(shard.rows, sources.ParquetRows):
            continue
        url = shard.rows.file_url
        if url is None:
            # The built-in sample set, found in the driver's own cache (planning has just made it).
            from ssim_ray.sources.sample import ensure_sample_dataset

            url = ensure_sample_dataset(cache_dir=cfg.source.cache_dir)
        if not urls or urls[-1] != url:
            urls.append(url)
    return list(dict.fromkeys(urls))


def _check_group_by(group_by, results: pa.Schema) -> None:
    if group_by is None:
        return
    if group_by not in results.names:
        raise ValueError(f"summary.group_by={group_by!r} is not a column of the results; they have "
                         f"{', '.join(results.names)}")
    column_type = results.field(group_by).type
    try:
        pa.array([], type=column_type).cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise ValueError(
            f"summary.group_by={group_by!r} names a column of type {column_type}, which has no text form to group "
            "by; name a column of numbers, strings or booleans"
        ) from None
