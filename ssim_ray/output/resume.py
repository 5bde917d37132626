"""The run manifest (`_run.json`) and the resume decision: may this run reuse the shards already committed?

A run's shards can be reused only by a run with the same plan (fingerprint, pair and shard counts) and the
same metric settings, since any of them changes the rows. The manifest, written before any shard, records
them (without credentials); `check_resume_compatible` compares it with what is there and answers "new",
"resume" or "overwrite", or refuses.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict
from typing import Any, Dict, List, Mapping, Optional

from ssim_ray.config import OUTPUT_MODES
from ssim_ray.output.commit import committed_shard_ids
from ssim_ray.output.layout import (
    MARKER_SUFFIX,
    PREVIOUS_OUTPUTS,
    RUN_MANIFEST,
    SHARDS_DIR,
    output_filesystem,
    write_bytes,
)
from ssim_ray.output.provenance import utc_now
from ssim_ray.secrets import scrub

MANIFEST_FORMAT = "ssim_ray.run/1"


class ResumeConflictError(RuntimeError):
    """The output already holds a run whose plan or metric differs from this one."""


def build_run_manifest(
    *,
    plan_fingerprint: str,
    total_pairs: int,
    num_shards: int,
    metric: Mapping[str, Any],
    source: Mapping[str, Any],
) -> Dict[str, Any]:
    """The run manifest `_run.json`: what a resumed run must agree with, without credentials.

    Args:
        plan_fingerprint: `Plan.fingerprint`.
        total_pairs: `Plan.total_pairs`.
        num_shards: how many shards the plan has.
        metric: the metric's name and every option that changes scores (`run_manifest` gives the name with
            every `ssim.*` option).
        source: a description of the source (e.g. `dataclasses.asdict(cfg.source)`); scrubbed here.

    Returns:
        A JSON-serialisable dict.

    Example:
        >>> m = build_run_manifest(plan_fingerprint="abc", total_pairs=3, num_shards=1,
        ...                        metric={"name": "wang2004"}, source={"storage_options": {"secret": "s"}})
        >>> m["source"]["storage_options"]["secret"]
        '<redacted>'
    """
    return {
        "format": MANIFEST_FORMAT,
        "plan_fingerprint": plan_fingerprint,
        "total_pairs": int(total_pairs),
        "num_shards": int(num_shards),
        "metric": scrub(dict(metric)),
        "source": scrub(dict(source)),
        "created": utc_now(),
    }


def run_manifest(*, plan: Any, cfg: Any) -> Dict[str, Any]:
    """The run manifest of a planned job: `build_run_manifest` from a `sources.Plan` and an AuditJobConfig.

    The metric entry is `cfg.ssim.describe()`, every setting that changes a score (the same function writes
    summary.json's metric block): a resume must agree on all of them.

    Args:
        plan: `sources.plan_shards(cfg.source)`.
        cfg: the job's AuditJobConfig.

    Returns:
        The manifest dict for `check_resume_compatible`.

    Example:
        >>> from types import SimpleNamespace
        >>> from ssim_ray.config import AuditJobConfig
        >>> plan = SimpleNamespace(fingerprint="f", total_pairs=2, shards=("s0",))
        >>> run_manifest(plan=plan, cfg=AuditJobConfig())["metric"]["name"]
        'wang2004'
    """
    return build_run_manifest(
        plan_fingerprint=plan.fingerprint,
        total_pairs=plan.total_pairs,
        num_shards=len(plan.shards),
        metric=cfg.ssim.describe(),
        source=asdict(cfg.source),
    )


def _flatten(prefix: str, value: Any) -> Dict[str, Any]:
    if isinstance(value, Mapping):
        flat: Dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return flat
    return {prefix: value}


def manifest_differences(existing: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """What differs between two run manifests in the fields a resume must keep (plan and metric).

    Example:
        >>> manifest_differences({"plan_fingerprint": "a", "metric": {"k1": 0.01}},
        ...                      {"plan_fingerprint": "a", "metric": {"k1": 0.02}})
        ['metric.k1: output has 0.01, this run has 0.02']
    """
    keys = ("plan_fingerprint", "total_pairs", "num_shards", "metric")
    old = _flatten("", {k: existing.get(k) for k in keys})
    now = _flatten("", {k: new.get(k) for k in keys})
    return [f"{name}: output has {old.get(name)!r}, this run has {now.get(name)!r}"
            for name in sorted(set(old) | set(now)) if old.get(name) != now.get(name)]


def clear_outputs(output_url: str, *, storage_options: Optional[Mapping[str, Any]] = None) -> None:
    """Remove a previous run's outputs: markers first (so nothing stays committed), then part files, then
    ssim.parquet, summary.json, report.html, plots/ and _run.json. Nothing else under `output_url`.

    Example:
        >>> clear_outputs("memory://doc-clear")
    """
    fs, root = output_filesystem(output_url, storage_options)
    fs.invalidate_cache(root)
    folder = f"{root}/{SHARDS_DIR}"
    if fs.exists(folder):
        names = [posixpath.basename(p) for p in fs.ls(folder, detail=False)]
        markers = [f"{folder}/{n}" for n in names if n.endswith(MARKER_SUFFIX)]
        if markers:
            fs.rm(markers)
        fs.rm(folder, recursive=True)
    for name in PREVIOUS_OUTPUTS:
        path = f"{root}/{name}"
        if fs.exists(path):
            fs.rm(path, recursive=True)


def _read_manifest(fs: Any, path: str) -> Optional[Dict[str, Any]]:
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError) as error:
        raise ResumeConflictError(
            f"{path} must be a JSON run manifest, got unreadable content ({error}); use a new output.url, or "
            "output.mode=overwrite to discard what is there"
        ) from error


def check_resume_compatible(
    output_url: str,
    run_manifest: Mapping[str, Any],
    *,
    mode: str,
    storage_options: Optional[Mapping[str, Any]] = None,
) -> str:
    """Make sure the output belongs to this run before any shard is computed or skipped.

    - No `_run.json` and no committed shard: write the manifest; returns "new".
    - Same plan fingerprint, pair and shard counts, and metric settings: returns "resume" (the manifest
      already there is kept, with its creation time).
    - Otherwise, with mode "resume": raise, naming each difference. With mode "overwrite": remove the
      previous outputs (`clear_outputs`), write the new manifest; returns "overwrite".

    Args:
        output_url: the run's output folder.
        run_manifest: from `build_run_manifest`.
        mode: `output.mode`, "resume" or "overwrite".
        storage_options: fsspec options for `output_url`.

    Returns:
        "new", "resume" or "overwrite".

    Raises:
        ValueError: an unknown mode.
        ResumeConflictError: the output holds another run (or committed shards without a manifest, or an
            unreadable manifest) and mode is "resume".

    Example:
        >>> m = build_run_manifest(plan_fingerprint="f1", total_pairs=1, num_shards=1, metric={}, source={})
        >>> check_resume_compatible("memory://doc-run", m, mode="resume")
        'new'
        >>> check_resume_compatible("memory://doc-run", m, mode="resume")
        'resume'
    """
    if mode not in OUTPUT_MODES:
        raise ValueError(f"mode must be one of {list(OUTPUT_MODES)}, got {mode!r}")
    fs, root = output_filesystem(output_url, storage_options)
    path = f"{root}/{RUN_MANIFEST}"
    if mode == "overwrite":
        clear_outputs(output_url, storage_options=storage_options)
        write_bytes(fs, path, json.dumps(scrub(dict(run_manifest)), indent=1).encode("utf-8"))
        return "overwrite"
    existing = _read_manifest(fs, path)
    if existing is None:
        committed = committed_shard_ids(output_url, storage_options=storage_options)
        if committed:
            raise ResumeConflictError(
                f"{output_url} holds {len(committed)} committed shards but no {RUN_MANIFEST}, so they cannot be "
                "checked against this run; use a new output.url, or output.mode=overwrite to discard them"
            )
        write_bytes(fs, path, json.dumps(scrub(dict(run_manifest)), indent=1).encode("utf-8"))
        return "new"
    differences = manifest_differences(existing, run_manifest)
    if differences:
        raise ResumeConflictError(
            f"{output_url} holds a run with a different plan or metric, so its shards cannot be reused: "
            + "; ".join(differences)
            + ". Use a new output.url, or output.mode=overwrite to discard the previous results."
        )
    return "resume"
