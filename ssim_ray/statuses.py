"""Row statuses: every outcome a pair can have, named once.

Every pair of a dataset becomes exactly one result row, and its `status` says what happened to it. Sources
give the per-pair input statuses, the worker `compute_error`, the driver `worker_failed`; statistics,
gates and the report read them. All of them import the names from here.
"""

from __future__ import annotations

from typing import Dict

OK = "ok"
MISSING = "missing"
FORBIDDEN = "forbidden"
INVALID_PATH = "invalid_path"
UNSUPPORTED_SCHEME = "unsupported_scheme"
FETCH_ERROR = "fetch_error"
UNREADABLE = "unreadable"
SIZE_MISMATCH = "size_mismatch"
CHANNEL_MISMATCH = "channel_mismatch"
DEPTH_MISMATCH = "depth_mismatch"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
PATH_ESCAPE = "path_escape"
UNPAIRED = "unpaired"
HAS_ALPHA = "has_alpha"
UNSUPPORTED = "unsupported"
MULTI_FRAME = "multi_frame"
ORIENTATION_MISMATCH = "orientation_mismatch"
COMPUTE_ERROR = "compute_error"
WORKER_FAILED = "worker_failed"

# What each status means, in the order the README lists them.
DESCRIPTIONS: Dict[str, str] = {
    OK: "scored",
    MISSING: "an image does not exist",
    FORBIDDEN: "the store refused access to an image (permission denied, HTTP 401/403)",
    INVALID_PATH: "a manifest path cannot name a file (a NUL byte, a name too long for the filesystem)",
    UNSUPPORTED_SCHEME: "no filesystem for the URL's scheme is installed (e.g. gs:// without gcsfs)",
    FETCH_ERROR: "fetching an image failed for another reason (the error names it); outages fail the shard instead",
    UNREADABLE: "an image cannot be read or decoded (a folder, empty, truncated, not an image)",
    SIZE_MISMATCH: "the two images differ in height or width",
    CHANNEL_MISMATCH: "the two images differ in channel count",
    DEPTH_MISMATCH: "one image is 8-bit, the other 16-bit (their data ranges differ)",
    TOO_SMALL: "an image is smaller than the window (after downsampling)",
    TOO_LARGE: "an image has more pixels than source.max_pixels",
    PATH_ESCAPE: "a manifest path leaves its base folder or uses a scheme that is not allowed",
    UNPAIRED: "a prefix key exists on one side only",
    HAS_ALPHA: "an image has an alpha channel and ssim.alpha=error",
    UNSUPPORTED: "a pixel format that cannot be decoded exactly (CMYK, float)",
    MULTI_FRAME: "an image has several frames or pages and source.multi_frame=error",
    ORIENTATION_MISMATCH: "the two images' EXIF orientations differ and source.exif_orientation=error",
    COMPUTE_ERROR: "the metric raised for this pair alone",
    WORKER_FAILED: "its shard failed on every attempt",
}

# Statuses a source gives while loading pairs (ok included).
SOURCE_STATUSES = (OK, MISSING, FORBIDDEN, INVALID_PATH, UNSUPPORTED_SCHEME, FETCH_ERROR, UNREADABLE, SIZE_MISMATCH,
                   CHANNEL_MISMATCH, DEPTH_MISMATCH, TOO_SMALL, TOO_LARGE, PATH_ESCAPE, UNPAIRED, HAS_ALPHA, UNSUPPORTED,
                   MULTI_FRAME, ORIENTATION_MISMATCH)
ALL_STATUSES = tuple(DESCRIPTIONS)
FAILURE_STATUSES = tuple(s for s in ALL_STATUSES if s != OK)


def is_ok(status: str) -> bool:
    """Whether a row with this status carries scores.

    Example:
        >>> is_ok("ok"), is_ok("missing")
        (True, False)
    """
    return status == OK
