"""What ties a committed shard to the runs that may reuse it: run ids, the metric digest, the commit stamp.

Every marker records a `CommitStamp`: the plan fingerprint (what defines the shards' content: the source's
identity, the manifest footers or the listing, pairs per shard, columns), the digest of the metric settings
(`AuditJobConfig.describe_metric()`: every setting that changes a score, and the metrics computed, so a run
with other `metrics` has another digest) and the id of the run that wrote it. A resume or `output.merge_only`
reuses a shard only when its stamp has this run's plan fingerprint and metric digest (`resume.check_commits`);
the run id says who wrote it (summary.json counts shards by run).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class CommitStamp:
    """What a marker records about where its rows come from.

    Attributes:
        plan_fingerprint: `Plan.fingerprint` of the plan the shard belongs to.
        metric_sha256: `metric_digest` of the metric settings the shard was scored with.
        run_id: the run that wrote the marker (`new_run_id`).
    """

    plan_fingerprint: str
    metric_sha256: str
    run_id: str

    def __post_init__(self) -> None:
        for name in ("plan_fingerprint", "metric_sha256", "run_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"CommitStamp.{name} must be a non-empty string, got {value!r}")


def metric_digest(settings: Mapping[str, Any]) -> str:
    """The sha256 of the metric settings, as markers record it (canonical JSON: sorted keys).

    Args:
        settings: `AuditJobConfig.describe_metric()`: every setting that changes a score, and the metrics.

    Returns:
        64 hex digits.

    Example:
        >>> metric_digest({"k1": 0.01, "name": "wang2004"}) == metric_digest({"name": "wang2004", "k1": 0.01})
        True
    """
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True, default=str).encode("utf-8")).hexdigest()


def new_run_id() -> str:
    """A new run's id: its UTC start time (so ids sort by start) and 8 random hex digits.

    Example:
        >>> run_id = new_run_id()
        >>> len(run_id), run_id[8], run_id[15:17]
        (25, 'T', 'Z-')
    """
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{started}-{uuid.uuid4().hex[:8]}"


def short(digest: str) -> str:
    """The first 12 characters of a digest or fingerprint, for messages.

    Example:
        >>> short("0123456789abcdef0123")
        '0123456789ab…'
    """
    return digest[:12] + "…" if len(digest) > 12 else digest
