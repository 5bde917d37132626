"""scripts/slurm_ssim_audit.sbatch submitted to a real one-node SLURM on 127.0.0.1 (Debian's slurm-wlm: slurmctld,
slurmd, munged), its Ray head started by the recipe with token authentication, and the audit's outputs checked.

The fixture writes a minimal slurm.conf into a temporary folder and points every SLURM command at it with
SLURM_CONF; nothing of the machine's own SLURM or munge configuration is read or changed. The daemons run as the
current user (root in CI; only that is tried here: slurmd starts job steps as the submitting user). If munged
cannot start, the cluster falls back to auth/none and the test prints munged's log. Skipped only when the SLURM
or munge binaries are absent: .ci/run installs them.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from job_fixtures import make_job_dataset, read_results, read_summary

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "scripts" / "slurm_ssim_audit.sbatch"
RAY = str(Path(sys.executable).with_name("ray"))
# Daemons live in /usr/sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel", "munged", "munge", "unmunge")
MISSING = [name for name in BINARIES if shutil.which(name, path=SEARCH_PATH) is None]
# Ray's head ports other than the GCS port, so that this cluster never meets another on the machine.
RAY_PORT_OPTIONS = ("--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                    "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
                    "--object-manager-port")
FINAL_JOB_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                    "DEADLINE", "PREEMPTED"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"SLURM/munge binaries absent ({', '.join(MISSING)}): "
                       "apt-get install slurm-wlm munge (.ci/run does)"),
]


def _free_ports(count: int) -> List[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _binary(name: str) -> str:
    return shutil.which(name, path=SEARCH_PATH)


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a daemon started by the fixture (its own session), then SIGKILL its group if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _start_munged(root: Path) -> Optional[subprocess.Popen]:
    """munged with its own key and socket under `root`; None (and why, printed) when it does not come up."""
    key = root / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    socket_path = root / "munge.sock"
    command = [_binary("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
               f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}",
               f"--log-file={root / 'munged.log'}"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process.poll() is None:
        check = subprocess.run(f"{_binary('munge')} -n -S {socket_path} | {_binary('unmunge')} -S {socket_path}",
                               shell=True, capture_output=True, text=True)
        if check.returncode == 0:
            return process
        time.sleep(0.3)
    _stop(process)
    log = (root / "munged.log").read_text() if (root / "munged.log").exists() else "(no log)"
    print(f"munged did not start (exit {process.returncode}); using auth/none. Its log:\n{log}")
    return None


def _slurm_conf(root: Path, *, node: str, cpus: int, munge_socket: Optional[Path]) -> str:
    ctld_port, slurmd_port = _free_ports(2)
    auth = (["AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}"]
            if munge_socket is not None else ["AuthType=auth/none", "CredType=cred/none"])
    user = getpass.getuser()
    lines = [
        "ClusterName=ssimtest", f"SlurmctldHost={node}(127.0.0.1)", f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}", f"SlurmUser={user}", f"SlurmdUser={user}", *auth,
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "MailProg=/bin/true",
        "ReturnToService=2", "MinJobAge=600", "KillWait=10",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class SlurmCluster:
    root: Path
    env: Dict[str, str]
    node: str
    cpus: int

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([_binary(command[0]), *command[1:]], env=self.env, capture_output=True, text=True,
                              timeout=60, **kwargs)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n" + (self.root / name).read_text()[-3000:]
                         for name in ("slurmctld.log", "slurmd.log") if (self.root / name).exists())


def _wait_node_idle(cluster: SlurmCluster, daemons: List[subprocess.Popen], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        dead = [p.args[0] for p in daemons if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited before the node was up:\n{cluster.logs()}")
        state = cluster.run("sinfo", "-h", "-n", cluster.node, "-o", "%T").stdout.strip()
        if state == "idle":
            return
        time.sleep(0.5)
    raise TimeoutError(f"node {cluster.node} is {state!r}, not idle, after {timeout} s:\n{cluster.logs()}")


@pytest.fixture(scope="module")
def slurm_cluster():
    """munged, slurmctld and slurmd on 127.0.0.1 (one node, `debug` partition), each in its own session and
    stopped at the end; their configuration, state, spool and logs in a short temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    node = socket.gethostname().split(".")[0]
    cpus = min(2, os.cpu_count() or 1)
    daemons: List[subprocess.Popen] = []
    munged = _start_munged(root)
    if munged is not None:
        daemons.append(munged)
    (root / "slurm.conf").write_text(_slurm_conf(root, node=node, cpus=cpus,
                                                 munge_socket=root / "munge.sock" if munged else None))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "RAY_"))}
    env["SLURM_CONF"] = str(root / "slurm.conf")
    cluster = SlurmCluster(root=root, env=env, node=node, cpus=cpus)
    try:
        for command in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", node]):
            with open(root / f"{command[0]}.out", "wb") as out:
                daemons.append(subprocess.Popen([_binary(command[0]), *command[1:]], env=env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True))
        _wait_node_idle(cluster, daemons[1:] if munged else daemons)
        yield cluster
    finally:
        subprocess.run([_binary("scancel"), "--full", "--partition=debug"], env=env, capture_output=True)
        for process in reversed(daemons):
            _stop(process)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_job(cluster: SlurmCluster, job_id: str, timeout: float) -> Dict[str, str]:
    """Poll `scontrol show job` until the job is in a final state; its fields as a dict."""
    deadline = time.monotonic() + timeout
    fields: Dict[str, str] = {}
    while time.monotonic() < deadline:
        shown = cluster.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", shown))
        if fields.get("JobState") in FINAL_JOB_STATES:
            return fields
        time.sleep(1)
    cluster.run("scancel", job_id)
    raise TimeoutError(f"job {job_id} still {fields.get('JobState')!r} after {timeout} s:\n{cluster.logs()}")


def _processes_mentioning(text: str) -> List[str]:
    """Command lines of live processes that mention `text` (zombies have none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(f"{entry.name}: {command[:200]}")
    return found


def _ray_env(cluster: SlurmCluster, ray_temp: Path, token: Path) -> Dict[str, str]:
    """The environment sbatch passes to the recipe: this venv's Python and Ray, the token, free ports, loopback."""
    gcs_port, *other_ports = _free_ports(1 + len(RAY_PORT_OPTIONS))
    head_options = ["--include-dashboard=false"] + [f"{option}={port}"
                                                     for option, port in zip(RAY_PORT_OPTIONS, other_ports)]
    return {**cluster.env, "PYTHON": sys.executable, "RAY": RAY, "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_HEAD_IP": "127.0.0.1", "RAY_PORT": str(gcs_port), "RAY_TEMP_DIR": str(ray_temp),
            "RAY_HEAD_OPTIONS": " ".join(head_options), "RAY_STOP_GRACE_S": "5",
            # Ray replaces a loopback node address by the machine's own unless told that the cluster is one
            # machine; the test addresses 127.0.0.1 only.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _sbatch(cluster: SlurmCluster, env: Dict[str, str], log: Path, overrides: List[str],
            timeout: float = 400) -> Tuple[Dict[str, str], str]:
    """Submit the recipe on one node with the test's resources, wait for it; (job fields, job log)."""
    command = [_binary("sbatch"), "--parsable", "--nodes=1", f"--cpus-per-task={cluster.cpus}", "--gpus-per-task=0",
               "--time=10", f"--output={log}", str(RECIPE), *overrides]
    submitted = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr + cluster.logs()
    job = _wait_for_job(cluster, submitted.stdout.strip().split(";")[0], timeout=timeout)
    return job, log.read_text() if log.exists() else "(no job log)"


def test_sbatch_recipe_runs_the_audit_on_a_local_slurm(slurm_cluster, tmp_path):
    data = make_job_dataset(tmp_path / "data", photos=("camera", "coffee"))
    output = tmp_path / "audit"
    scratch = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    token = scratch / "token"
    token.write_text(secrets.token_hex(32))
    ray_temp = scratch / "ray"
    overrides = ["source=parquet", f"source.url={data.manifest}", "source.pairs_per_shard=24",
                 "runtime.num_workers=1", "report.enabled=false", f"output.url={output}",
                 f"hydra.run.dir={tmp_path / 'hydra'}"]
    try:
        job, job_log = _sbatch(slurm_cluster, _ray_env(slurm_cluster, ray_temp, token), tmp_path / "job.log",
                               overrides)
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), job_log[-4000:]
        assert "has 1 node(s)" in job_log
        assert "stopped this job's Ray head" in job_log
        # Nothing runs from this job's Ray folder any more.
        assert _processes_mentioning(str(ray_temp)) == []
    finally:
        for line in _processes_mentioning(str(ray_temp)):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)

    rows = read_results(output)
    assert rows.num_rows == data.total
    assert sorted(rows.column("pair_id").to_pylist()) == sorted(data.ok_pairs + list(data.bad_status))
    summary = read_summary(output)
    assert summary["complete"] is True
    assert summary["pairs"]["planned"] == summary["pairs"]["merged"] == data.total
    assert summary["pairs"]["ok"] == len(data.ok_pairs)
    assert summary["shards"]["missing"] == 0 and summary["shards"]["committed"] == summary["shards"]["total"] == 2


def test_sbatch_recipe_refuses_to_start_without_a_ray_token(slurm_cluster, tmp_path):
    scratch = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    try:
        env = _ray_env(slurm_cluster, scratch / "ray", token=scratch / "no-token")
        job, job_log = _sbatch(slurm_cluster, env, tmp_path / "job.log",
                               ["source=sample", f"output.url={tmp_path / 'audit'}"], timeout=60)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), job_log
    assert f"no Ray token at {scratch / 'no-token'}" in job_log
    assert not (tmp_path / "audit").exists()
