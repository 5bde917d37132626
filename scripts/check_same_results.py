"""Same results before and after a change: run the audit with an earlier revision and with this tree, compare.

    python scripts/check_same_results.py --baseline <git revision> [--work /tmp/same-results]

Runs the built-in sample audit, the same with the compiled CPU kernels from the first batch (`ssim.compile=always`,
all three metrics) and a Parquet audit (a manifest written from the sample set, with a pass-through column and
relative paths) once with the baseline revision (checked out into a git worktree and run with
PYTHONPATH pointing at it, so its Ray workers import it too) and once with this tree, each in its own
process on a fresh local Ray, and compares the two `ssim.parquet` files of each pair of runs: row order
(pair_id), statuses, errors, and the exact bits of `ssim` and `ssim_per_channel`, and of `psnr`, `ms_ssim` and
their per-channel lists (the Parquet audit runs all three metrics) where both runs wrote them. Prints a table
and exits 1 on any difference. The `decoder` and `shard_id` columns are compared too (same plan, same decoder).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

REPO = pathlib.Path(__file__).resolve().parents[1]
COMPARED = ("pair_id", "status", "error", "ssim", "ssim_per_channel", "height", "width", "channels", "data_range",
            "bit_depth", "decoder", "shard_id", "psnr", "psnr_per_channel", "ms_ssim", "ms_ssim_per_channel",
            "ms_ssim_undefined")
SCORES = ("ssim", "ssim_per_channel", "psnr", "psnr_per_channel", "ms_ssim", "ms_ssim_per_channel")


def _run_audit(code_root: pathlib.Path, out: pathlib.Path, overrides: List[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(code_root))
    command = [sys.executable, "-m", "jobs.ssim_audit", f"output.url={out}", f"hydra.run.dir={out}-hydra",
               "report.enabled=false", *overrides]
    done = subprocess.run(command, cwd=code_root, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"audit failed in {code_root} ({' '.join(overrides)}):\n{done.stderr[-3000:]}")


def _sample_manifest(folder: pathlib.Path) -> pathlib.Path:
    """A Parquet manifest of the sample set in its own folder, with relative paths and a pass-through column."""
    sys.path.insert(0, str(REPO))
    from ssim_ray.sources.sample import ensure_sample_dataset

    sample = pathlib.Path(ensure_sample_dataset())
    table = pq.read_table(sample)
    shutil.copytree(sample.parent, folder, dirs_exist_ok=True)
    manifest = folder / "manifest_copy.parquet"
    pq.write_table(table.append_column("batch_note", pa.array([f"n{i % 3}" for i in range(table.num_rows)])),
                   manifest, row_group_size=50)
    return manifest


def _bits(values) -> Tuple:
    if values is None:
        return (None,)
    if isinstance(values, list):
        return tuple(struct.pack("<d", v) if v is not None else None for v in values)
    return (struct.pack("<d", values),)


def _differences(old: pa.Table, new: pa.Table) -> Dict[str, int]:
    if old.num_rows != new.num_rows:
        return {"rows": abs(old.num_rows - new.num_rows)}
    found: Dict[str, int] = {}
    for column in COMPARED:
        if column not in old.column_names or column not in new.column_names:
            continue  # a metric neither run (or only one) wrote: shown as "-"
        a, b = old[column].to_pylist(), new[column].to_pylist()
        if column in SCORES:
            a, b = [_bits(v) for v in a], [_bits(v) for v in b]
        found[column] = sum(1 for x, y in zip(a, b) if x != y)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against, e.g. HEAD~3")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args()
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="same-results-"))
    baseline = work / "baseline-tree"
    if not baseline.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                       check=True, capture_output=True)
    manifest = _sample_manifest(work / "parquet-set")
    cases = {"sample": [], "parquet": ["source=parquet", f"source.url={manifest}", "source.pairs_per_shard=40",
                                       "summary.group_by=batch_note", "metrics=[ssim,psnr,ms_ssim]"],
             # The compiled CPU kernels from the first batch (a sample run this small otherwise stays eager).
             "sample compiled": ["ssim.compile=always", "metrics=[ssim,psnr,ms_ssim]"]}
    failed = False
    print(f"| case | rows | {' | '.join(COMPARED)} |")
    print("|---|---:|" + "---:|" * len(COMPARED))
    try:
        for name, overrides in cases.items():
            _run_audit(baseline, work / f"{name}-baseline", overrides)
            _run_audit(REPO, work / f"{name}-this-tree", overrides)
            old = pq.read_table(work / f"{name}-baseline" / "ssim.parquet")
            new = pq.read_table(work / f"{name}-this-tree" / "ssim.parquet")
            diffs = _differences(old, new)
            failed |= any(diffs.values())
            print(f"| {name} | {new.num_rows} | " + " | ".join(str(diffs.get(c, "-")) for c in COMPARED) + " |")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(baseline)], capture_output=True)
    print("differences above are rows that differ; all zeros: the same results, bit for bit" if not failed
          else "RESULTS DIFFER")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
