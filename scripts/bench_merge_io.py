"""Merge with part files read one at a time against read ahead on threads, on local disk and on S3.

`python scripts/bench_merge_io.py [--rows 200000] [--parts 2000] [--rounds 3]`

Builds an audit output with scripts/bench_report.py's builder (synthetic scores for real sample pairs),
copies it to a bucket on a moto S3 server on 127.0.0.1 (its own process) (a local stand-in: its round trips are far shorter
than a real store's, so the S3 gain here is a lower bound), then times `output.merge.merge` with
`MERGE_READ_AHEAD` = 1 (sequential, as before) and the default, alternating in one process; medians.
Both settings must give the same ssim.parquet bytes and summary statistics (checked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_report  # noqa: E402  (the builder of the synthetic output)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"moto_server did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def _merge(url: str, plan: dict, storage_options: dict, read_ahead: int) -> tuple:
    from ssim_ray.config import SummaryConfig
    from ssim_ray.output import merge as merging
    from ssim_ray.output.merge import RunInfo, merge

    merging.MERGE_READ_AHEAD = read_ahead
    began = time.perf_counter()
    summary = merge(url, plan_shard_ids=plan["shards"], summary_cfg=SummaryConfig(group_by="distortion"),
                    run_info=RunInfo(metric=plan["metric"], plan_fingerprint=plan["fingerprint"],
                                     total_pairs=plan["total"]), storage_options=storage_options)
    seconds = time.perf_counter() - began
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    digest = hashlib.sha256(fs.cat_file(f"{root}/ssim.parquet")).hexdigest()
    stats = json.dumps(summary["ssim"], sort_keys=True)
    return seconds, digest, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--parts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from ssim_ray.output import merge as merging

    default = merging.MERGE_READ_AHEAD
    workdir = Path(tempfile.mkdtemp(prefix="bench_merge_io-"))
    bench_report.build(workdir, rows=args.rows, parts=args.parts)
    plan = json.loads((workdir / "plan.json").read_text())

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[name] = value
    # moto in a process of its own: in this one it would share the GIL with the merge it serves.
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(port)
    try:
        s3 = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        import fsspec

        fs = fsspec.filesystem("s3", **s3)
        fs.mkdir("merge-bench")
        fs.put(str(workdir / "out") + "/", "merge-bench/out/", recursive=True)
        places = {"local disk": (str(workdir / "out"), {}), "S3 (moto on 127.0.0.1)": ("s3://merge-bench/out", s3)}
        rows = []
        for place, (url, options) in places.items():
            times = {1: [], default: []}
            outputs = set()
            for round_index in range(args.rounds):
                for read_ahead in ((1, default) if round_index % 2 == 0 else (default, 1)):
                    seconds, digest, stats = _merge(url, plan, options, read_ahead)
                    times[read_ahead].append(seconds)
                    outputs.add((digest, stats))
                    print(f"{place}, read ahead {read_ahead}: {seconds:.2f} s", file=sys.stderr, flush=True)
            if len(outputs) != 1:
                raise SystemExit(f"{place}: the merges differ between read-ahead settings")
            one, ahead = statistics.median(times[1]), statistics.median(times[default])
            rows.append(f"| {place} | {args.rows:,} | {args.parts:,} | {one:.2f} | {ahead:.2f} | {one / ahead:.2f}x |")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\n{bench_report._machine()}; {args.rounds} rounds, medians; identical ssim.parquet and statistics")
    print(f"| output | rows | part files | merge s, one part at a time | merge s, {default} read ahead | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
