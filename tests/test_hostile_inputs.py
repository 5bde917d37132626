"""Hostile rows: whatever one row's input raises while it is fetched or decoded, that row gets a typed status
and the good pairs of its shard keep theirs; no signed URL reaches a row, an exception or the console.

Each case is a manifest of 24 good pairs (crops of scikit-image's photographs against noisy copies) plus one
bad row, loaded as one shard. Only faults of the process itself (MemoryError) still fail the shard.
"""

from __future__ import annotations

import http.server
import importlib.util
import io
import threading
import traceback

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from fsspec import register_implementation
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image
from skimage import data

from ssim_ray import statuses
from ssim_ray.config import SourceConfig, SSIMConfig
from ssim_ray.sources import decode, iter_shard_pairs, plan_shards, storage

GOOD_PAIRS = 24
SIGNATURE = "f00dfacecafe5ec7e7516a7e0000000000000000000000000000000000000abc"
PRESIGNED_QUERY = (
    "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLEKEYID%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
    f"&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={SIGNATURE}"
)
ALL_SCHEMES = ["file", "s3", "gs", "gcs", "az", "abfs", "http", "https", "hostile"]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_set(tmp_path_factory):
    """24 good pairs as files under <root>/set/images; returns (root, manifest rows, encoded reference 0)."""
    root = tmp_path_factory.mktemp("hostile")
    images = root / "set" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(12)
    photo = data.astronaut()
    rows = []
    for index in range(GOOD_PAIRS):
        top, left = 13 * index, 9 * index
        crop = np.ascontiguousarray(photo[top:top + 48, left:left + 64])
        noisy = np.clip(crop + rng.normal(0, 12, crop.shape), 0, 255).astype(np.uint8)
        (images / f"ref{index}.png").write_bytes(_png(crop))
        (images / f"dist{index}.png").write_bytes(_png(noisy))
        rows.append((f"good{index}", f"images/ref{index}.png", f"images/dist{index}.png"))
    return root, rows


def _load_with(root, rows, bad_reference, *, bad_distorted="images/dist0.png", **cfg_options):
    """Load 24 good pairs plus one row (`bad`) in a single shard; returns {pair_id: LoadedPair}."""
    all_rows = rows[:12] + [("bad", bad_reference, bad_distorted)] + rows[12:]
    manifest = root / "set" / "pairs.parquet"
    pq.write_table(pa.table({
        "pair_id": [r[0] for r in all_rows], "reference": pa.array([r[1] for r in all_rows], pa.string()),
        "distorted": pa.array([r[2] for r in all_rows], pa.string()),
    }), manifest)
    cfg_options = {"allowed_schemes": ALL_SCHEMES, "fetch_retries": 1, **cfg_options}
    cfg = SourceConfig(kind="parquet", url=str(manifest), **cfg_options)
    plan = plan_shards(cfg)
    assert len(plan.shards) == 1
    return {p.pair_id: p for p in iter_shard_pairs(plan.shards[0], cfg, SSIMConfig(), threads=2, prefetch=4)}


def _assert_good_pairs_kept(pairs):
    assert len(pairs) == GOOD_PAIRS + 1
    for index in range(GOOD_PAIRS):
        pair = pairs[f"good{index}"]
        assert pair.status == "ok" and pair.ref.shape == (3, 48, 64), (pair.pair_id, pair.error)


def _assert_bad(pair, status, *named):
    assert pair.status == status, pair.error
    assert pair.status in statuses.SOURCE_STATUSES
    assert pair.ref is None and "\n" not in pair.error and "\x00" not in pair.error
    for part in named:
        assert part in pair.error, pair.error


# ------------------------------------------------------------------------------------------ local paths
def test_scheme_case_is_normalised_so_file_url_in_capitals_loads(good_set):
    root, rows = good_set
    absolute = root / "set" / "images" / "ref0.png"
    pairs = _load_with(root, rows, f"File://{absolute}")
    _assert_good_pairs_kept(pairs)
    assert pairs["bad"].status == "ok"
    assert bool((pairs["bad"].ref == pairs["good0"].ref).all())


def test_path_component_over_255_bytes_is_an_invalid_path_row(good_set):
    root, rows = good_set
    pairs = _load_with(root, rows, "images/" + "a" * 300 + ".png")
    _assert_good_pairs_kept(pairs)
    _assert_bad(pairs["bad"], "invalid_path", "reference", "aaaa", "too long")


def test_nul_byte_in_a_path_is_an_invalid_path_row_with_the_byte_escaped(good_set):
    root, rows = good_set
    pairs = _load_with(root, rows, "images/ref\x000.png")
    _assert_good_pairs_kept(pairs)
    _assert_bad(pairs["bad"], "invalid_path", "reference", "ref\\x000.png", "NUL")


@pytest.mark.parametrize("scheme, package", [("gs", "gcsfs"), ("az", "adlfs")])
def test_scheme_whose_filesystem_is_not_installed_is_an_unsupported_scheme_row(good_set, scheme, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: the scheme is supported")
    root, rows = good_set
    pairs = _load_with(root, rows, f"{scheme}://bucket/set/ref0.png")
    _assert_good_pairs_kept(pairs)
    _assert_bad(pairs["bad"], "unsupported_scheme", "reference", f"{scheme}://bucket/set/ref0.png", package)


def test_unknown_scheme_that_is_allowed_is_an_unsupported_scheme_row(good_set):
    root, rows = good_set
    pairs = _load_with(root, rows, "images/ref0.png", bad_distorted="nosuchfs://x/y.png",
                       allowed_schemes=ALL_SCHEMES + ["nosuchfs"])
    _assert_good_pairs_kept(pairs)
    _assert_bad(pairs["bad"], "unsupported_scheme", "distorted", "nosuchfs")


# ------------------------------------------------------------------------------------------ S3 (moto)
def test_upper_case_s3_scheme_reads_the_object(good_set, s3_bucket, s3_storage_options):
    root, rows = good_set
    s3fs.S3FileSystem(**s3_storage_options).pipe(f"{s3_bucket}/set/ref0.png", (root / "set/images/ref0.png").read_bytes())
    pairs = _load_with(root, rows, f"S3://{s3_bucket}/set/ref0.png", storage_options=s3_storage_options)
    _assert_good_pairs_kept(pairs)
    assert pairs["bad"].status == "ok" and bool((pairs["bad"].ref == pairs["good0"].ref).all())


# ------------------------------------------------------------------------------------------ HTTP
class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers /status/<code>/... with that code; /ok/<name> with the bytes registered for it."""

    payloads: dict = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if parts[0] == "status":
            self.send_response(int(parts[1]))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.payloads.get(parts[-1])
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        if self.command == "GET" and body:
            self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):  # keep the test's stderr for what the sources print
        pass


@pytest.fixture(scope="module")
def http_base(good_set):
    root, _ = good_set
    _Handler.payloads = {"ref0.png": (root / "set/images/ref0.png").read_bytes()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("code, status", [(403, "forbidden"), (401, "forbidden"), (404, "missing"), (410, "missing"),
                                          (400, "fetch_error"), (422, "fetch_error")])
def test_http_error_answers_are_typed_rows(good_set, http_base, code, status):
    root, rows = good_set
    pairs = _load_with(root, rows, f"{http_base}/status/{code}/ref0.png")
    _assert_good_pairs_kept(pairs)
    _assert_bad(pairs["bad"], status, "reference", f"/status/{code}/ref0.png")


def test_http_url_that_answers_is_read(good_set, http_base):
    root, rows = good_set
    pairs = _load_with(root, rows, f"{http_base}/ok/ref0.png")
    assert pairs["bad"].status == "ok" and bool((pairs["bad"].ref == pairs["good0"].ref).all())


def test_forbidden_presigned_url_prints_no_signature_anywhere(good_set, http_base, capfd):
    root, rows = good_set
    pairs = _load_with(root, rows, f"{http_base}/status/403/ref0.png?{PRESIGNED_QUERY}")
    out, err = capfd.readouterr()
    _assert_bad(pairs["bad"], "forbidden", "/status/403/ref0.png", "X-Amz-Signature=***")
    row_text = repr(vars(pairs["bad"]))
    for text in (row_text, out, err):
        assert SIGNATURE not in text and "AKIAEXAMPLEKEYID" not in text


def test_server_error_beyond_retries_fails_the_shard_without_the_signature(good_set, http_base, capfd):
    """A 503 is an outage, not a row: the shard is retried as a whole, and what propagates is redacted."""
    root, rows = good_set
    with pytest.raises(storage.StorageUnavailableError) as caught:
        _load_with(root, rows, f"{http_base}/status/503/ref0.png?{PRESIGNED_QUERY}")
    printed = "".join(traceback.format_exception(caught.type, caught.value, caught.tb))
    out, err = capfd.readouterr()
    assert "/status/503/ref0.png" in printed and "X-Amz-Signature=***" in printed
    for text in (printed, repr(caught.value.args), out, err):
        assert SIGNATURE not in text and "AKIAEXAMPLEKEYID" not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# ------------------------------------------------------------------------------------------ any exception
class _HostileFS(MemoryFileSystem):
    """hostile://<kind>/...: reading (opened or whole) raises the exception named by <kind>."""

    protocol = "hostile"
    root_marker = ""
    errors = {
        "runtime": lambda: RuntimeError("backend said no"),
        "key": lambda: KeyError("Contents"),
        "value": lambda: ValueError("bad URL for this backend"),
        "memory": lambda: MemoryError(),
    }

    @classmethod
    def _strip_protocol(cls, path):
        return path.replace("hostile://", "", 1).lstrip("/")

    def _open(self, path, mode="rb", **kwargs):
        raise self.errors[self._strip_protocol(path).split("/")[0]]()

    def cat_file(self, path, start=None, end=None, **kwargs):
        raise self.errors[self._strip_protocol(path).split("/")[0]]()

    def info(self, path, **kwargs):
        return {"name": path, "size": 1, "type": "file"}


@pytest.fixture
def hostile_fs():
    register_implementation("hostile", _HostileFS, clobber=True)
    return _HostileFS


@pytest.mark.parametrize("kind, named", [("runtime", "RuntimeError: backend said no"), ("key", "KeyError"),
                                         ("value", "ValueError: bad URL")])
def test_any_exception_of_a_filesystem_is_a_fetch_error_row(good_set, hostile_fs, kind, named):
    root, rows = good_set
    pairs = _load_with(root, rows, "images/ref0.png", bad_distorted=f"hostile://{kind}/dist0.png")
    _assert_good_pairs_kept(pairs)
    _assert_bad(pairs["bad"], "fetch_error", "distorted", f"hostile://{kind}/dist0.png", named)


def test_memory_error_is_a_fault_of_the_process_and_fails_the_shard(good_set, hostile_fs):
    root, rows = good_set
    with pytest.raises(MemoryError):
        _load_with(root, rows, "hostile://memory/ref0.png")


def test_any_exception_of_the_decoder_is_an_unreadable_row(good_set, monkeypatch):
    root, rows = good_set
    real = decode._exact_pixels

    def exploding(image, payload, *, name):
        if "odd.png" in name:
            raise NotImplementedError("decoder cannot do this")
        return real(image, payload, name=name)

    (root / "set/images/odd.png").write_bytes((root / "set/images/dist5.png").read_bytes())
    monkeypatch.setattr(decode, "_exact_pixels", exploding)
    pairs = _load_with(root, rows, "images/ref5.png", bad_distorted="images/odd.png")
    _assert_good_pairs_kept(pairs)
    _assert_bad(pairs["bad"], "unreadable", "distorted", "odd.png", "NotImplementedError: decoder cannot do this")


def test_permission_error_is_forbidden(good_set, hostile_fs, monkeypatch):
    monkeypatch.setitem(_HostileFS.errors, "denied", lambda: PermissionError(13, "Permission denied"))
    root, rows = good_set
    pairs = _load_with(root, rows, "hostile://denied/ref0.png")
    _assert_good_pairs_kept(pairs)
    _assert_bad(pairs["bad"], "forbidden", "reference", "hostile://denied/ref0.png")
