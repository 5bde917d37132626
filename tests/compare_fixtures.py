"""Audit output folders built directly, for the comparison's tests of the join, statistics and gates.

`write_audit` writes what `ssim_ray.compare` reads of an audit: ssim.parquet (the result columns, any score
columns given, pass-through columns), summary.json (metric block, plan fingerprint, group_by, complete) and
_run.json. No images: tests that need the report's pictures run real audits (tests/test_compare_audits.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.output.schema import METRIC_COLUMNS, RESULT_SCHEMA

SCORES = ("ssim", "psnr", "ms_ssim")


def row(pair_id: str, ssim: Optional[float] = None, *, status: str = "ok", codec: str = "jpeg",
        **scores: Optional[float]) -> Dict[str, Any]:
    """One result row: ok rows get the scores given; failed rows get none and an error."""
    failed = status != "ok"
    values = {"pair_id": pair_id, "reference": f"ref/{pair_id}.png", "distorted": f"dist/{pair_id}.png",
              "status": status, "error": f"{status}: dist/{pair_id}.png" if failed else None,
              "shard_id": "shard-00000", "ssim": None if failed else ssim, "codec": codec}
    values.update({name: (None if failed else value) for name, value in scores.items()})
    return values


def write_audit(folder: Path, rows: Sequence[Mapping[str, Any]], *, plan: str = "plan-1",
                metric: Optional[Mapping[str, Any]] = None, group_by: Optional[str] = "codec",
                complete: bool = True, scores: Sequence[str] = ("ssim",), row_group_size: int = 1000,
                legacy: bool = False) -> str:
    """Write an audit's output folder under `folder`; return its URL (the path).

    As an audit does: every column of RESULT_SCHEMA (a metric not in `scores` null in every row) and the
    metric block of `SSIMConfig.describe(scores)`, which lists the metrics computed. `legacy`: as an audit
    from before PSNR and MS-SSIM were columns: only the score columns in `scores`, no list of metrics.
    """
    folder.mkdir(parents=True, exist_ok=True)
    arrays: List[pa.Array] = []
    names: List[str] = []
    absent = {column for name, columns in METRIC_COLUMNS.items() if name not in scores for column in columns}
    for field in RESULT_SCHEMA:
        if legacy and field.name in absent:
            continue
        arrays.append(pa.array([r.get(field.name) for r in rows], type=field.type))
        names.append(field.name)
    for name in [s for s in scores if s not in names] + ["codec"]:
        arrays.append(pa.array([r.get(name) for r in rows], type=pa.string() if name == "codec" else pa.float64()))
        names.append(name)
    pq.write_table(pa.Table.from_arrays(arrays, names=names), folder / "ssim.parquet", row_group_size=row_group_size)
    described = dict(metric if metric is not None else SSIMConfig().describe(list(scores)))
    if legacy:
        described.pop("metrics", None)
    summary = {"format": "ssim_ray.summary/1", "created": "2025-01-01T00:00:00Z", "run_id": f"run-{folder.name}",
               "complete": complete, "metric": described, "plan_fingerprint": plan, "group_by": group_by,
               "shards": {"missing": 0 if complete else 1}}
    (folder / "summary.json").write_text(json.dumps(summary))
    manifest = {"plan_fingerprint": plan, "metric": described, "source": vars(SourceConfig()) | {},
                "run_id": f"run-{folder.name}"}
    (folder / "_run.json").write_text(json.dumps(manifest, default=str))
    return str(folder)


def read_compare(out: Path) -> tuple:
    """(compare.parquet rows by pair_id, compare.json)."""
    table = pq.read_table(out / "compare.parquet")
    return {r["pair_id"]: r for r in table.to_pylist()}, json.loads((out / "compare.json").read_text())
