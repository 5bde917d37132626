"""No secret in any file the job writes or any log it prints, Hydra's saved config included.

What Hydra itself saves, in the run folder's `.hydra/`: `config.yaml` (the composed config, interpolations as
written), `hydra.yaml` (Hydra's own config, with the command line's overrides) and `overrides.yaml` (the
command line's overrides). A presigned URL given through an interpolation (`${oc.env:VAR}`) is saved as the
interpolation; given literally, or credentials given as storage options, the job refuses before Hydra writes
anything (jobs/callbacks.py). The job's own files (`_run.json`, markers, part files, `ssim.parquet`,
`summary.json`, `report.html`) pass what came from the user through ssim_ray.secrets.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
import urllib.parse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from job_fixtures import make_job_dataset

from ssim_ray import secrets

REPO = pathlib.Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- unit level

SECRET_FORMS = {
    "userinfo": ("https://alice:hunter2@host/a.png", "hunter2"),
    "presigned_s3": ("https://b.s3.amazonaws.com/a.png?X-Amz-Credential=AKIAXXX%2F2026&X-Amz-Signature=f00dfeed",
                     "f00dfeed"),
    "presigned_gcs": ("https://storage.googleapis.com/b/a.png?X-Goog-Signature=c0ffee42&x=1", "c0ffee42"),
    "azure_sas": ("https://acct.blob.core.windows.net/c/a.png?sv=2024&sig=abcSAS%3D&se=2027", "abcSAS"),
    "token_param": ("https://host/a.png?access_token=tok-777", "tok-777"),
}


@pytest.mark.parametrize("form", sorted(SECRET_FORMS))
def test_every_url_form_is_redacted_and_found(form):
    url, secret = SECRET_FORMS[form]
    assert secret not in secrets.redact_text(url) and secrets.contains_credentials(url)
    assert secret not in json.dumps(secrets.scrub({"source": {"url": url}}))
    assert secrets.literal_secrets({"source": {"url": url}}) == ["source.url"]
    with pytest.raises(ValueError):  # storage options never take credentials, under any of these names
        secrets.reject_credentials("source.storage_options", {"headers": {"Authorization": secret}})


@pytest.mark.parametrize("key", ["key", "secret", "token", "password", "api_key", "apiKey", "Authorization",
                                 "connection_string", "account_key", "sas_token", "client_secret",
                                 "aws_session_token", "private_key_id"])
def test_credential_named_keys_are_refused_and_scrubbed(key):
    with pytest.raises(ValueError, match="credentials are not accepted"):
        secrets.reject_credentials("output.storage_options", {"client_kwargs": {key: "s3cr3t"}})
    assert "s3cr3t" not in json.dumps(secrets.scrub({"client_kwargs": {key: "s3cr3t"}}))


@pytest.mark.parametrize("key", ["endpoint_url", "region_name", "anon", "use_ssl", "requester_pays", "profile"])
def test_ordinary_options_stay(key):
    secrets.reject_credentials("source.storage_options", {"client_kwargs": {key: "x"}})
    assert secrets.scrub({key: "x"}) == {key: "x"}


def test_interpolations_are_not_literal_secrets():
    assert secrets.literal_secrets({"source": {"url": "${oc.env:SIGNED_URL}"}}) == []


# ---------------------------------------------------------------------------------------------- job level

def _presign(client, bucket: str, key: str) -> str:
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600)


def _signature(url: str) -> str:
    return urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["X-Amz-Signature"][0]


@pytest.fixture
def presigned_manifest(tmp_path, s3_endpoint, s3_bucket):
    """A manifest on the moto server whose rows are presigned http URLs; returns (manifest URL, signatures)."""
    import boto3
    from botocore.config import Config

    # The camera's 21 pairs come first in the dataset either way (same seed, same order): the first 10 rows
    # are the same files with or without the astronaut's, which would only be written and never read.
    data = make_job_dataset(tmp_path / "data", photos=("camera",), with_bad=False)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          config=Config(signature_version="s3v4"))
    rows, signatures = [], set()
    for row in pq.read_table(data.manifest).to_pylist()[:10]:
        for side in ("reference", "distorted"):
            client.upload_file(str(data.root / row[side]), s3_bucket, row[side])
            row[side] = _presign(client, s3_bucket, row[side])
            signatures.add(_signature(row[side]))
        rows.append(row)
    missing = _presign(client, s3_bucket, "distorted/not_there.png")  # a 404 whose error names its URL
    rows.append({"pair_id": "gone", "reference": rows[0]["reference"], "distorted": missing, "codec": "bad"})
    signatures.add(_signature(missing))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    client.put_object(Bucket=s3_bucket, Key="manifest.parquet", Body=sink.getvalue().to_pybytes())
    manifest_url = _presign(client, s3_bucket, "manifest.parquet")
    signatures.add(_signature(manifest_url))
    return manifest_url, signatures


def _text_of(path: pathlib.Path) -> str:
    if path.suffix == ".parquet":  # compressed: read the values, not the bytes
        return json.dumps(pq.read_table(path).to_pylist(), default=str)
    return path.read_bytes().decode("utf-8", errors="replace")


def _files_with(root: pathlib.Path, needles, since: float = 0.0):
    hits = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= since):
        text = _text_of(path)
        found = [n for n in needles if n in text]
        if found:
            hits[str(path)] = found
    return hits


@pytest.mark.slow
def test_a_presigned_run_writes_and_prints_no_signature(tmp_path, presigned_manifest, s3_endpoint):
    manifest_url, signatures = presigned_manifest
    started = time.time()
    run_dir = tmp_path / "run"
    env = dict(os.environ, SIGNED_MANIFEST_URL=manifest_url)
    command = [sys.executable, "-m", "jobs.ssim_audit", "source=parquet", "source.url=${oc.env:SIGNED_MANIFEST_URL}",
               "source.allowed_schemes=[http]", "source.pairs_per_shard=4", "runtime.num_workers=1",
               "summary.group_by=codec", "report.worst_k=3", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "results" / "summary.json").read_text())
    assert summary["status_counts"] == {"ok": 10, "missing": 1}  # the run really read the presigned objects
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "results" / "report.html").exists()
    assert _files_with(run_dir, signatures) == {}, "a signature reached a file the job or Hydra wrote"
    assert not [s for s in signatures if s in done.stdout + done.stderr], "a signature was printed"
    ray_logs = pathlib.Path("/tmp/ray/session_latest/logs")
    if ray_logs.exists():
        assert _files_with(ray_logs.resolve(), signatures, since=started) == {}, "a signature reached Ray's logs"


PLANTED_OVERRIDES = [
    "+source.storage_options.headers.Authorization=Bearer PLANTED-TOKEN-1",
    "+output.storage_options.secret=PLANTED-TOKEN-1",
    "source.url='https://h/m.parquet?X-Amz-Credential=a&X-Amz-Signature=PLANTED-TOKEN-1'",
]


@pytest.fixture(scope="module")
def refused_runs(tmp_path_factory) -> dict:
    """{override: (run folder, finished process)}: the job run with each planted credential, in its own folder.

    The three runs are started side by side (each one is mostly Python start-up and imports) and each test
    below reads its own."""
    started = {}
    for i, override in enumerate(PLANTED_OVERRIDES):
        folder = tmp_path_factory.mktemp(f"refused{i}")
        command = [sys.executable, "-m", "jobs.ssim_audit", "source=parquet", "source.url=/nonexistent.parquet",
                   override, f"hydra.run.dir={folder / 'run'}"]
        started[override] = (folder / "run", command, subprocess.Popen(
            command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = {}
    try:
        for override, (run_dir, command, proc) in started.items():
            stdout, stderr = proc.communicate(timeout=300)
            done[override] = (run_dir, subprocess.CompletedProcess(command, proc.returncode, stdout, stderr))
    finally:
        for _, _, proc in started.values():
            proc.kill()  # a no-op once it has exited: none is left running after a timeout
    return done


@pytest.mark.parametrize("override", PLANTED_OVERRIDES)
def test_credentials_on_the_command_line_are_refused_before_hydra_writes(refused_runs, override):
    run_dir, done = refused_runs[override]
    assert done.returncode == 1
    assert "credentials" in done.stderr and "PLANTED-TOKEN-1" not in done.stdout + done.stderr
    assert not run_dir.exists() or _files_with(run_dir, ["PLANTED-TOKEN-1"]) == {}
