"""Shared test set-up.

GPU tests carry the `gpu` marker. Without a CUDA device they are deselected (listed in the summary as
deselected, not silently passed); selecting them explicitly with `-m gpu` on a machine without a GPU is an
error, so a GPU check can never "pass" by running nothing.
"""

from __future__ import annotations

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marker_expr = config.getoption("-m") or ""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or _cuda_available():
        return
    if "gpu" in marker_expr and "not gpu" not in marker_expr:
        raise pytest.UsageError(
            f"{len(gpu_items)} gpu-marked tests were selected with -m {marker_expr!r}, "
            "but torch.cuda.is_available() is False on this machine"
        )
    config.hook.pytest_deselected(items=gpu_items)
    items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


@pytest.fixture(autouse=True)
def _pillow_pixel_cap_restored():
    """The decoder sets Pillow's process-wide pixel cap to the configured `max_pixels` on purpose
    (`ssim_ray.sources.decode`); a test that decodes under a small cap must not leave it to the tests that
    run after it in the same worker (a 1664x1701 reference photo once failed as a 'decompression bomb')."""
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


# ---------------------------------------------------------------------------------------------------------
# S3 fixtures: a moto server on 127.0.0.1 (no network). Owned by the pair-sources work (issue 3); the job
# tests use them too.
# ---------------------------------------------------------------------------------------------------------

_DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No profile or credentials file of the machine may leak into a test.
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/ssim_ray-tests/credentials",
    "AWS_CONFIG_FILE": "/nonexistent/ssim_ray-tests/config",
}


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """The URL of a moto S3 server on 127.0.0.1 (free port), for the whole session.

    Dummy credentials (`testing`) and region are put in `os.environ` for the session, before any test
    starts Ray: Ray worker processes inherit the driver's environment as it is at `ray.init`, so a test
    that starts Ray after requesting this fixture gives its workers the same credentials. Pass the
    endpoint explicitly through storage options (see `s3_storage_options`); do not rely on endpoint
    environment variables, which some clients ignore.
    """
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("AWS_PROFILE", raising=False)
        for name, value in _DUMMY_AWS_ENV.items():
            patch.setenv(name, value)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_storage_options(s3_endpoint):
    """fsspec storage options for the moto server, `{"client_kwargs": {"endpoint_url": ...}}`, on an empty server.

    Each test starts from an empty server (POST /moto-api/reset) and with s3fs's instance cache cleared,
    so no listing cached by an earlier test is seen. Use as `SourceConfig(storage_options=...)` or
    `OutputConfig(storage_options=...)`; it holds no credentials.
    """
    import urllib.request

    import s3fs

    urllib.request.urlopen(urllib.request.Request(f"{s3_endpoint}/moto-api/reset", method="POST")).close()
    s3fs.S3FileSystem.clear_instance_cache()
    return {"client_kwargs": {"endpoint_url": s3_endpoint}}


@pytest.fixture
def s3_bucket(s3_storage_options):
    """The name of a fresh, empty bucket (`ssim-ray-test`) on the moto server; URLs are `s3://ssim-ray-test/...`."""
    import s3fs

    name = "ssim-ray-test"
    s3fs.S3FileSystem(**s3_storage_options).mkdir(name)
    return name
