"""One run at a time per output (issue 12, point 4): the claim (`ssim_ray.output.claim`) on local disk and on
the moto S3 server, and two real jobs released together from a barrier after planning: exactly one writes.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ssim_ray.output.claim import CLAIM_FORMAT, ClaimHeldError, ClaimLostError, OutputClaim, _here
from ssim_ray.output.layout import CLAIM_FILE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """(output URL, storage options, fsspec filesystem, path of the claim file) on local disk or moto S3."""
    if request.param == "local":
        import fsspec

        out = str(tmp_path / "out")
        return out, {}, fsspec.filesystem("file"), f"{out}/{CLAIM_FILE}"
    import s3fs

    options = request.getfixturevalue("s3_storage_options")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", options, s3fs.S3FileSystem(**options), f"{bucket}/out/{CLAIM_FILE}"


def _claim(store, run_id: str, ttl_s: float = 60.0) -> OutputClaim:
    url, options, _, _ = store
    return OutputClaim(url, run_id=run_id, ttl_s=ttl_s, storage_options=options)


def _claim_doc(run_id: str, *, heartbeat_age_s: float, host: str = "another-host", pid: int = 4242, **more) -> bytes:
    doc = {"format": CLAIM_FORMAT, "run_id": run_id, "purpose": "audit", "host": host, "pid": pid, "boot_id": None,
           "pid_started": None, "started": "2026-01-01T00:00:00+00:00", "heartbeat": "",
           "heartbeat_unix": time.time() - heartbeat_age_s, "ttl_s": 60.0, **more}
    return json.dumps(doc).encode()


def _plant(store, data: bytes) -> None:
    url, _, fs, path = store
    if not url.startswith("s3://"):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def _holder(store) -> str:
    _, _, fs, path = store
    fs.invalidate_cache()
    return json.loads(fs.cat_file(path))["run_id"]


def test_a_second_claim_is_refused_naming_the_holder_until_released(store):
    first = _claim(store, "run-a").acquire()
    with pytest.raises(ClaimHeldError, match=r"is being written by run run-a \(audit, host .*pid \d+.*claim_ttl_s"):
        _claim(store, "run-b").acquire()
    first.release()
    assert not store[2].exists(store[3])
    second = _claim(store, "run-b").acquire()
    assert _holder(store) == "run-b" and second.taken_over is None
    second.release()


def test_the_heartbeat_keeps_a_claim_alive_beyond_its_lease(store):
    holder = _claim(store, "run-a", ttl_s=1.0).acquire()
    time.sleep(2.5)  # two and a half leases: without heartbeats the claim would be stale by now
    with pytest.raises(ClaimHeldError, match="run-a"):
        _claim(store, "run-b", ttl_s=1.0).acquire()
    holder.ensure_held()
    holder.release()


def test_a_stale_claim_is_taken_over_with_a_message(store):
    _plant(store, _claim_doc("crashed-run", heartbeat_age_s=3600))
    taker = _claim(store, "run-b").acquire()
    assert "took over the output's claim from run crashed-run" in taker.taken_over
    assert "heartbeat is 3600 s old" in taker.taken_over
    assert _holder(store) == "run-b"
    taker.release()


def test_a_claim_whose_process_is_gone_on_this_host_is_taken_over_at_once(store):
    here = _here()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _plant(store, _claim_doc("killed-run", heartbeat_age_s=1, host=here["host"], pid=gone.pid,
                             boot_id=here["boot_id"]))
    taker = _claim(store, "run-b").acquire()
    assert f"process (pid {gone.pid} on this host) is gone" in taker.taken_over
    taker.release()


def test_a_fresh_claim_of_another_host_is_not_taken_over(store):
    _plant(store, _claim_doc("remote-run", heartbeat_age_s=5, host="elsewhere"))
    with pytest.raises(ClaimHeldError, match="remote-run"):
        _claim(store, "run-b").acquire()


@pytest.mark.parametrize("stale", [False, True], ids=["no-claim", "stale-claim"])
def test_of_many_runs_racing_for_a_claim_exactly_one_wins(store, stale):
    if stale:
        _plant(store, _claim_doc("crashed-run", heartbeat_age_s=3600))
    racers = 8
    start, won, refused = threading.Barrier(racers), [], []

    def race(index: int) -> None:
        claim = _claim(store, f"run-{index}")
        start.wait()
        try:
            won.append(claim.acquire())
        except ClaimHeldError as error:
            refused.append(str(error))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1 and len(refused) == racers - 1
    assert _holder(store) == won[0].run_id
    assert all(won[0].run_id in message or "changed" in message for message in refused)
    won[0].release()


def test_a_claim_taken_over_while_held_is_reported_lost_and_not_released(store):
    holder = _claim(store, "run-a", ttl_s=0.4).acquire()
    _plant(store, _claim_doc("usurper", heartbeat_age_s=0))  # as if run-a had stalled past its lease
    deadline = time.monotonic() + 10
    with pytest.raises(ClaimLostError, match="taken over; it is now held by run usurper"):
        while time.monotonic() < deadline:  # until the next heartbeat finds the other claim
            holder.ensure_held()
            time.sleep(0.05)
    holder.release()
    assert _holder(store) == "usurper"  # the new holder's claim stays


# ------------------------------------------------------------------------------------------------- real jobs

# A real job (jobs.ssim_audit through Hydra) held after planning until the test creates `go`: the barrier is
# the test's own wrapper around the library's planning, installed in the subprocess only.
_HELD_JOB = r"""
import os, runpy, sys, time
import ssim_ray.sources as sources
barrier, name = sys.argv[1], sys.argv[2]
plan_shards = sources.plan_shards
def planned_then_held(cfg):
    plan = plan_shards(cfg)
    open(os.path.join(barrier, "ready-" + name), "w").close()
    while not os.path.exists(os.path.join(barrier, "go")):
        time.sleep(0.005)
    return plan
sources.plan_shards = planned_then_held
sys.argv = ["jobs.ssim_audit"] + sys.argv[3:]
runpy.run_module("jobs.ssim_audit", run_name="__main__")
"""


def _race_two_jobs(tmp_path: Path, manifest: Path, output: str, extra=()) -> list:
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = []
    # The same plan and metric (both pass a resume check), but summaries that tell the two runs apart.
    for name, worst_k in (("a", 2), ("b", 5)):
        args = ["source=parquet", f"source.url={manifest}", "source.pairs_per_shard=12", f"output.url={output}",
                "runtime.num_workers=1", "runtime.progress_interval_s=1", "report.enabled=false",
                f"summary.worst_k={worst_k}", f"hydra.run.dir={tmp_path / ('run-' + name)}", *extra]
        procs.append(subprocess.Popen([sys.executable, "-c", _HELD_JOB, str(barrier), name, *args], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 180
    while not all((barrier / f"ready-{n}").exists() for n in "ab"):
        dead = [p for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, [p.communicate()[1][-3000:] for p in dead]
        time.sleep(0.01)
    (barrier / "go").touch()
    results = []
    for proc, worst_k in zip(procs, (2, 5)):
        stdout, stderr = proc.communicate(timeout=600)
        results.append((proc.returncode, stdout, stderr, worst_k))
    return results


def _check_one_winner(results, read_summary_json, output: str) -> dict:
    from ssim_ray.run import RunOutcome, print_summary

    codes = sorted(code for code, *_ in results)
    assert codes == [0, 1], [(code, err[-2000:]) for code, _, err, _ in results]
    (_, won_out, _, worst_k), = [r for r in results if r[0] == 0]
    (_, _, lost_err, _), = [r for r in results if r[0] == 1]
    run_id = [line.split(": ", 1)[1] for line in won_out.splitlines() if line.startswith("  run: ")][0]
    assert f"is being written by run {run_id}" in lost_err
    summary = read_summary_json()
    assert summary["run_id"] == run_id and len(summary["worst"]) == worst_k
    assert summary["shards"]["by_run"] == {run_id: summary["shards"]["total"]}
    printed = io.StringIO()
    print_summary(RunOutcome(summary=summary, exit_code=0, output_url=output), printed)
    assert won_out[won_out.index("\nSSIM audit"):] == printed.getvalue()
    return summary


@pytest.mark.slow
def test_two_jobs_released_together_on_local_disk_one_writes_the_other_is_refused(tmp_path):
    from job_fixtures import make_job_dataset, read_results

    data = make_job_dataset(tmp_path / "data", photos=("camera", "astronaut"), with_bad=False)
    out = tmp_path / "out"
    out.mkdir()
    # A claim left by a crashed run: both jobs find it stale, and only one may take it over.
    (out / CLAIM_FILE).write_bytes(_claim_doc("crashed-run", heartbeat_age_s=3600))
    results = _race_two_jobs(tmp_path, data.manifest, str(out))
    summary = _check_one_winner(results, lambda: json.loads((out / "summary.json").read_text()), str(out))
    won_err = [err for code, _, err, _ in results if code == 0][0]
    assert "took over the output's claim from run crashed-run" in won_err
    table = read_results(out)
    assert table.num_rows == len(set(table["pair_id"].to_pylist())) == data.total == summary["pairs"]["merged"]
    assert not (out / CLAIM_FILE).exists()  # released on exit


@pytest.mark.slow
def test_two_jobs_released_together_on_s3_one_writes_the_other_is_refused(tmp_path, s3_storage_options, s3_bucket):
    import s3fs

    from job_fixtures import make_job_dataset

    data = make_job_dataset(tmp_path / "data", photos=("camera", "astronaut"), with_bad=False)
    out = f"s3://{s3_bucket}/audits/race"
    endpoint = s3_storage_options["client_kwargs"]["endpoint_url"]
    fs = s3fs.S3FileSystem(**s3_storage_options)

    def read_summary() -> dict:
        fs.invalidate_cache()
        return json.loads(fs.cat_file(f"{out}/summary.json"))

    results = _race_two_jobs(tmp_path, data.manifest, out,
                             extra=[f"+output.storage_options.client_kwargs.endpoint_url={endpoint}"])
    summary = _check_one_winner(results, read_summary, out)
    with fs.open(f"{out}/ssim.parquet", "rb") as handle:
        assert pq.read_table(handle).num_rows == data.total == summary["pairs"]["merged"]
    assert not fs.exists(f"{out}/{CLAIM_FILE}")


def test_the_claim_names_this_host():
    assert _here()["host"] == socket.gethostname() and _here()["pid"] == os.getpid()
