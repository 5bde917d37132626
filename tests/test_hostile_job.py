"""Issue 12, point 1 end to end: a shard of 24 good pairs and hostile rows keeps every good score.

On a local Ray with one CPU actor, one shard holds 24 good pairs and rows whose reference is a `File://` URL
(upper-case scheme), a path component over 255 bytes, a NUL byte, `gs://` without gcsfs, and a presigned
http URL answering 403. No row is `worker_failed`; the good pairs have their direct scores; the signature of
the presigned URL is in no output file and no Ray log.
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from job_fixtures import direct_score, job_config, make_job_dataset, read_results

from ssim_ray.run import evaluate

pytestmark = pytest.mark.slow

SIGNATURE = "0badc0ffee5ec7e7516a7e00000000000000000000000000000000000000f00d"
PRESIGNED = f"X-Amz-Credential=AKIAEXAMPLEKEYID%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature={SIGNATURE}"


class _Forbidden(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def forbidden_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


def test_hostile_rows_keep_the_good_scores_of_their_shard(local_ray, forbidden_server, tmp_path):
    dataset = make_job_dataset(tmp_path / "data", photos=("camera", "astronaut"), with_bad=False)
    good = pq.read_table(dataset.manifest).to_pylist()[:24]
    first_reference = good[0]["reference"]
    hostile = {
        "bad/File-scheme": (f"File://{dataset.root / first_reference}", "ok"),
        "bad/long-name": ("reference/" + "n" * 300 + ".png", "invalid_path"),
        "bad/nul-byte": ("reference/camera\x00.png", "invalid_path"),
        "bad/gs-no-gcsfs": ("gs://bucket/reference/camera.png", "unsupported_scheme"),
        "bad/http-403": (f"{forbidden_server}/reference/camera.png?{PRESIGNED}", "forbidden"),
    }
    rows = good + [{"pair_id": pair_id, "reference": reference, "distorted": good[0]["distorted"], "codec": "bad"}
                   for pair_id, (reference, _) in hostile.items()]
    pq.write_table(pa.Table.from_pylist(rows), dataset.manifest)
    out = tmp_path / "out"
    cfg = job_config(dataset.manifest, out, pairs_per_shard=64, num_workers=1)
    cfg.source.allowed_schemes = ["file", "s3", "gs", "http"]
    outcome = evaluate(cfg, output_url=str(out))

    results = {row["pair_id"]: row for row in read_results(out).to_pylist()}
    assert len(results) == 29 and "worker_failed" not in {row["status"] for row in results.values()}
    for row in good:
        got = results[row["pair_id"]]
        assert got["status"] == "ok", got
        assert got["ssim"] == direct_score(dataset.root, row["reference"], row["distorted"])
    for pair_id, (_, status) in hostile.items():
        assert results[pair_id]["status"] == status, results[pair_id]
        assert status == "ok" or "\n" not in results[pair_id]["error"]
    assert results["bad/File-scheme"]["ssim"] == results[good[0]["pair_id"]]["ssim"]
    assert outcome.exit_code == 0
    _assert_signature_nowhere([out, Path(ray._private.worker._global_node.get_logs_dir_path())])


def _assert_signature_nowhere(folders):
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert SIGNATURE.encode() not in path.read_bytes(), path
