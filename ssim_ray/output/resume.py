"""The run manifest (`_run.json`) and the resume decision: may this run reuse the shards already committed?

A run's shards can be reused only by a run with the same plan (fingerprint, pair and shard counts) and the
same metric settings, since any of them changes the rows. The manifest, written before any shard, records
them (without credentials) and the runs that wrote here; `check_resume_compatible` compares it with what is
there and answers "new", "resume" or "overwrite", or refuses. Then every committed marker is checked on its
own (`check_commits`): its stamp must carry this run's plan fingerprint and metric digest, so shards copied
in, left by another plan whose manifest has the same name and row count, or written by a format that did
not record them are refused by name. Input versions are checked after that, by the actors (`inputs`).
The caller holds the output's claim (`claim`) throughout, so no other run changes what was checked.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ssim_ray.config import OUTPUT_MODES
from ssim_ray.output.commit import COMMIT_FORMAT, ShardCommit, committed_shard_ids
from ssim_ray.output.layout import (
    MARKER_SUFFIX,
    PREVIOUS_OUTPUTS,
    RUN_MANIFEST,
    SHARDS_DIR,
    output_filesystem,
)
from ssim_ray.output.provenance import utc_now
from ssim_ray.output.publish import is_temp_name, publish_bytes
from ssim_ray.output.stamps import CommitStamp, metric_digest, short
from ssim_ray.secrets import redact_text, scrub

MANIFEST_FORMAT = "ssim_ray.run/1"
_LISTED_SHARDS = 20  # shard ids a refusal names
_LISTED_RUNS = 100  # run ids _run.json keeps (the latest)


class ResumeConflictError(RuntimeError):
    """The output already holds a run whose plan or metric differs from this one."""


class ForeignShardsError(ResumeConflictError):
    """Committed shards of the plan were not computed for this plan and these metric settings."""


def build_run_manifest(
    *,
    plan_fingerprint: str,
    total_pairs: int,
    num_shards: int,
    metric: Mapping[str, Any],
    source: Mapping[str, Any],
    run_id: Optional[str] = None,
) -> Dict[str, Any]:
    """The run manifest `_run.json`: what a resumed run must agree with, without credentials.

    Args:
        plan_fingerprint: `Plan.fingerprint`.
        total_pairs: `Plan.total_pairs`.
        num_shards: how many shards the plan has.
        metric: the metric's name and every option that changes scores (`run_manifest` gives the name with
            every `ssim.*` option).
        source: a description of the source (e.g. `dataclasses.asdict(cfg.source)`); scrubbed here.
        run_id: the run writing it (`stamps.new_run_id`); a resume records its own id in `run_id` and appends
            it to `runs`.

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
        "metric_sha256": metric_digest(metric),
        "source": scrub(dict(source)),
        "created": utc_now(),
        "run_id": run_id,
        "runs": [run_id] if run_id else [],
    }


def run_manifest(*, plan: Any, cfg: Any, run_id: Optional[str] = None) -> Dict[str, Any]:
    """The run manifest of a planned job: `build_run_manifest` from a `sources.Plan` and an AuditJobConfig.

    The metric entry is `cfg.describe_metric()` (`SSIMConfig.describe` with the job's metrics), every setting
    that changes a score (the same function writes summary.json's metric block): a resume must agree on all.

    Args:
        plan: `sources.plan_shards(cfg.source)`.
        cfg: the job's AuditJobConfig.
        run_id: the run's id (`stamps.new_run_id`).

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
        metric=cfg.describe_metric(),
        source=asdict(cfg.source),
        run_id=run_id,
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
    ssim.parquet, summary.json, report.html, plots/, _run.json and temporary files a killed publication left
    (`publish.is_temp_name`). Nothing else under `output_url`: not the user's files, not the claim.

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
    if fs.exists(root):
        leftovers = [p for p in fs.ls(root, detail=False) if is_temp_name(posixpath.basename(p))]
        if leftovers:
            fs.rm(leftovers)


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
      already there is kept, with its creation time; its `run_id` becomes this run's, added to `runs`).
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
        _write_manifest(fs, path, run_manifest)
        return "overwrite"
    existing = _read_manifest(fs, path)
    if existing is None:
        committed = committed_shard_ids(output_url, storage_options=storage_options)
        if committed:
            raise ResumeConflictError(
                f"{output_url} holds {len(committed)} committed shards but no {RUN_MANIFEST}, so they cannot be "
                "checked against this run; use a new output.url, or output.mode=overwrite to discard them"
            )
        _write_manifest(fs, path, run_manifest)
        return "new"
    _refuse_differences(output_url, existing, run_manifest)
    run_id = run_manifest.get("run_id")
    if run_id and existing.get("run_id") != run_id:
        runs = [r for r in existing.get("runs", []) if r != run_id] + [run_id]
        _write_manifest(fs, path, {**existing, "run_id": run_id, "runs": runs[-_LISTED_RUNS:]})
    return "resume"


def _write_manifest(fs: Any, path: str, manifest: Mapping[str, Any]) -> None:
    publish_bytes(fs, path, json.dumps(scrub(dict(manifest)), indent=1).encode("utf-8"))


def _refuse_differences(output_url: str, existing: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    differences = manifest_differences(existing, manifest)
    if differences:
        raise ResumeConflictError(
            f"{output_url} holds a run with a different plan or metric, so its shards cannot be reused: "
            + "; ".join(differences)
            + ". Use a new output.url, or output.mode=overwrite to discard the previous results."
        )


def check_manifest(output_url: str, run_manifest: Mapping[str, Any], *,
                   storage_options: Optional[Mapping[str, Any]] = None) -> None:
    """Refuse an output whose `_run.json` records another plan or other metric settings; write nothing.

    What `output.merge_only` checks before it merges (an output without `_run.json` is left to the markers'
    own check, `check_commits`).

    Raises:
        ResumeConflictError: naming each difference, or an unreadable manifest.

    Example:
        >>> m = build_run_manifest(plan_fingerprint="f9", total_pairs=1, num_shards=1, metric={}, source={})
        >>> check_manifest("memory://doc-nothing", m)
    """
    fs, root = output_filesystem(output_url, storage_options)
    existing = _read_manifest(fs, f"{root}/{RUN_MANIFEST}")
    if existing is not None:
        _refuse_differences(output_url, existing, run_manifest)


def check_commits(commits: Mapping[str, ShardCommit], plan_shard_ids: Sequence[str], stamp: CommitStamp, *,
                  output_url: str) -> None:
    """Refuse when a committed shard of the plan was not computed for this plan and these metric settings.

    A shard id is a plan position and a digest of its rows' place in the manifest (file name, row range), so
    another manifest with the same name and row count has the same ids; the marker's stamp tells them apart:
    its plan fingerprint covers the manifest's footers, its metric digest every setting that changes a
    score. Markers without a stamp (legacy formats, or written outside a run) cannot be checked and are
    refused too. Committed shards that are not in the plan are not looked at (the merge ignores them).

    Args:
        commits: committed shards by id (`commit.scan_shards(...).commits`).
        plan_shard_ids: every shard id of the plan.
        stamp: this run's stamp (its plan fingerprint and metric digest are compared; the run id is not).
        output_url: for the message.

    Raises:
        ForeignShardsError: naming the shards (up to 20) and what they were computed for.

    Example:
        >>> check_commits({}, ["s0"], CommitStamp("f", "m", "r"), output_url="/out")
    """
    planned = [s for s in plan_shard_ids if s in commits]
    unstamped = [s for s in planned if commits[s].stamp is None]
    foreign = [s for s in planned if commits[s].stamp is not None and (
        commits[s].stamp.plan_fingerprint != stamp.plan_fingerprint
        or commits[s].stamp.metric_sha256 != stamp.metric_sha256)]
    problems = []
    if foreign:
        other = commits[foreign[0]].stamp
        problems.append(
            f"{_count(foreign)} {'belongs' if len(foreign) == 1 else 'belong'} to another plan or other metric "
            f"settings (e.g. shard {foreign[0]}: plan fingerprint {short(other.plan_fingerprint)}, metric digest "
            f"{short(other.metric_sha256)}, written by run {other.run_id}; this run has plan fingerprint "
            f"{short(stamp.plan_fingerprint)}, metric digest {short(stamp.metric_sha256)}): "
            + _ids(foreign))
    if unstamped:
        formats = sorted({commits[s].format for s in unstamped})
        problems.append(
            f"{_count(unstamped)} {'has a marker that does' if len(unstamped) == 1 else 'have markers that do'} "
            f"not record the plan and metric settings they were scored with (format {', '.join(formats)}; this version "
            f"writes {COMMIT_FORMAT}), so they cannot be checked: " + _ids(unstamped))
    if problems:
        raise ForeignShardsError(
            f"{redact_text(output_url)}: " + "; ".join(problems)
            + ". Use output.mode=overwrite to recompute them, or another output.url.")


def _count(shard_ids: Sequence[str]) -> str:
    return f"{len(shard_ids)} committed shard{'' if len(shard_ids) == 1 else 's'}"


def _ids(shard_ids: Sequence[str]) -> str:
    listed = ", ".join(shard_ids[:_LISTED_SHARDS])
    return listed + (f", … ({len(shard_ids) - _LISTED_SHARDS} more)" if len(shard_ids) > _LISTED_SHARDS else "")
