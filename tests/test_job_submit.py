"""`ray start --head` on 127.0.0.1 with token authentication, then `ray job submit` of the real job through
scripts/submit_cluster.sh: the same results as the job run locally."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from job_fixtures import make_job_dataset, read_results

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
PORT_OPTIONS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
                "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                "--node-manager-port", "--object-manager-port")


def _free_ports(count: int) -> list:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without the token): it is up
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Ray dashboard at {url} did not answer within {timeout} s")


@pytest.fixture
def ray_head():
    """A real one-node Ray cluster on 127.0.0.1, token auth on; killed as a process group at the end."""
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    (temp / "token").write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(temp / "token")}
    env.pop("RAY_ADDRESS", None)
    ports = dict(zip(PORT_OPTIONS, _free_ports(len(PORT_OPTIONS))))
    command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--num-cpus=2", f"--temp-dir={temp / 'ray'}", "--disable-usage-stats"]
    command += [f"{option}={port}" for option, port in ports.items()]
    head = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        _wait_for_dashboard(url, head)
        yield url, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            # `ray start --block` took 30-60 s to exit on SIGTERM (gcs_server may ignore it): a short grace, then
            # SIGKILL, which every run took anyway after the 5 s this used to wait
            head.wait(timeout=1)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def test_ray_job_submit_gives_the_same_results_as_a_local_run(ray_head, tmp_path):
    url, env = ray_head
    data = make_job_dataset(tmp_path / "data", photos=("camera", "coffee", "page"))
    overrides = ["source=parquet", f"source.url={data.manifest}", "source.pairs_per_shard=16",
                 "runtime.num_workers=2", "report.enabled=false"]
    # The local run (its own local Ray: no RAY_ADDRESS) runs while the job is submitted: the two share nothing but
    # the manifest they read, and much of each is waiting on Ray's start-up.
    local_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    local_log = tmp_path / "local.log"  # a file, not a pipe nobody reads while the job is submitted
    with open(local_log, "w") as log:
        local = subprocess.Popen(
            [sys.executable, "-m", "jobs.ssim_audit", *overrides, f"output.url={tmp_path / 'local'}",
             f"hydra.run.dir={tmp_path / 'hydra'}"],
            cwd=REPO, env=local_env, stdout=log, stderr=log,
        )
    try:
        submitted = subprocess.run(
            ["scripts/submit_cluster.sh", *overrides, f"output.url={tmp_path / 'cluster'}"],
            cwd=REPO, env={**env, "RAY_ADDRESS": url, "RAY": RAY, "PYTHON": sys.executable},
            capture_output=True, text=True, timeout=400,
        )
        local.wait(timeout=400)
    finally:
        if local.poll() is None:
            local.kill()
            local.wait()
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout + submitted.stderr
    assert local.returncode == 0, local_log.read_text()[-3000:]
    columns = ["pair_id", "status", "ssim", "ssim_per_channel", "height", "width", "error"]
    cluster_rows = read_results(tmp_path / "cluster").select(columns).to_pylist()
    local_rows = read_results(tmp_path / "local").select(columns).to_pylist()
    assert len(cluster_rows) == data.total
    assert cluster_rows == local_rows


def test_submit_script_requires_an_output_url(tmp_path):
    result = subprocess.run(["scripts/submit_cluster.sh", "source=sample"], cwd=REPO,
                            env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:1"}, capture_output=True, text=True)
    assert result.returncode == 2 and "output.url" in result.stderr
