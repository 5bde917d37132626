"""fsspec at the edge: open URLs with storage options, name listed files by URL, classify and retry storage
errors, resolve manifest paths. Reading an object with its version is `reading`'s.

URL schemes are case-insensitive (RFC 3986): `File://` and `S3://` are opened as `file://` and `s3://`. A
scheme with no filesystem installed (`gs://` without gcsfs) raises `UnsupportedSchemeError`. A transient
error that outlives its retries is the caller's to turn into `StorageUnavailableError` (see `fetch`).

Credentials never pass through here as arguments we keep: fsspec and its backends take them from the
environment or their own configuration. URLs that carry a `user:password@` part are redacted (by
`ssim_ray.secrets.redact_text`) before they are put into any message, id or fingerprint.
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import fsspec
from fsspec.core import url_to_fs

from ssim_ray.secrets import redact_text

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_LOCAL_PROTOCOLS = ("file", "local")
# errno values that mean "try again", as raised by local and network filesystems alike.
_TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
     errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EBUSY}
)
# Errors that say the object is not there or not ours to read: retrying cannot help.
_PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# HTTP answers worth retrying: timeouts, throttling, server errors. Other 4xx answers are permanent.
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
# aiohttp's connection errors (a dropped connection, a truncated body) are not all OSErrors; matched by
# name so that this module does not import aiohttp where no http filesystem is used.
_HTTP_CONNECTION_ERRORS = ("ClientConnectionError", "ClientPayloadError")


class PathEscapeError(ValueError):
    """A manifest path leaves its base folder, or uses a URL scheme that is not allowed."""


class UnsupportedSchemeError(ValueError):
    """No filesystem for a URL's scheme is installed or known to fsspec."""


class StorageUnavailableError(ConnectionError):
    """A storage error that outlived its retries: the shard is retried as a whole.

    Its message is redacted and it carries no cause: the original error may quote a signed URL, and Ray
    prints a failed task's exception, causes included, to the driver and its worker logs.
    """


def url_scheme(url: str) -> Optional[str]:
    """The scheme of `url`, lower-cased, or None for a plain path.

    Args:
        url: a URL (`s3://bucket/key`) or a local path.

    Returns:
        The scheme without `://`, lower-cased; None when `url` has none.

    Example:
        >>> url_scheme("S3://bucket/key.png"), url_scheme("/data/key.png")
        ('s3', None)
    """
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def normalise_url(url: str) -> str:
    """`url` with its scheme lower-cased: schemes are case-insensitive, fsspec's registry is not.

    Args:
        url: a URL or a local path.

    Returns:
        The same URL with a lower-case scheme; a plain path unchanged.

    Example:
        >>> normalise_url("S3://Bucket/Key.PNG"), normalise_url("/data/A.png")
        ('s3://Bucket/Key.PNG', '/data/A.png')
    """
    match = _SCHEME.match(url)
    return url if match is None else match.group(1).lower() + url[len(match.group(1)):]


def storage_options_for(url: str, storage_options: Mapping[str, Any]) -> Dict[str, Any]:
    """The options fsspec gets for `url`: the configured ones for remote stores, none for local files.

    Local paths get none because options such as `client_kwargs` are meant for the object store and a
    manifest on disk may point at objects in a bucket (or the other way round).

    Args:
        url: the URL about to be opened.
        storage_options: the configured options.

    Returns:
        A new dict to pass to fsspec.

    Example:
        >>> storage_options_for("/data/a.png", {"anon": True}), storage_options_for("s3://b/a.png", {"anon": True})
        ({}, {'anon': True})
    """
    scheme = url_scheme(url) or "file"
    return {} if scheme in _LOCAL_PROTOCOLS else dict(storage_options)


def open_url(url: str, *, storage_options: Mapping[str, Any]) -> Tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path within it for `url`.

    Args:
        url: a local path or any fsspec URL (file://, s3://, gs://, memory://...), scheme in any case.
        storage_options: options for remote filesystems (endpoint, region, anon...); never credentials.

    Returns:
        (filesystem, path) as `fsspec.core.url_to_fs` gives them. fsspec caches filesystem instances,
        so repeated calls with the same options are cheap.

    Raises:
        UnsupportedSchemeError: no filesystem for the scheme is installed (the message says which package).

    Example:
        >>> fs, path = open_url("MEMORY://bucket/a.png", storage_options={})
        >>> path
        '/bucket/a.png'
    """
    url = normalise_url(url)
    scheme = url_scheme(url)
    if scheme is not None:
        try:
            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            raise UnsupportedSchemeError(f"no filesystem for scheme {scheme!r} is installed ({detail})") from None
    return url_to_fs(url, **storage_options_for(url, storage_options))


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL for `path` within `fs` that any process can open: plain paths for local files, `scheme://...` otherwise.

    Planning lists files on the driver; workers open them again from these URLs, and messages name them.

    Args:
        fs: the filesystem, from `open_url`.
        path: a path within `fs`, as its listing gives it.

    Returns:
        The path itself for a local filesystem, else the path with its protocol put back.

    Example:
        >>> url_of(*open_url("memory://bucket/a.png", storage_options={}))
        'memory:///bucket/a.png'
        >>> url_of(*open_url("/data/a.png", storage_options={}))
        '/data/a.png'
    """
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return path if "file" in protocols else fs.unstrip_protocol(path)


def http_status(exc: BaseException) -> Optional[int]:
    """The HTTP error status an exception carries, itself or through its causes (fsspec's http filesystem
    raises `FileNotFoundError` from the 403 it got).

    Args:
        exc: the error a storage call raised.

    Returns:
        The status (400-599), or None.

    Example:
        >>> class Answer(Exception):
        ...     status = 403
        >>> try:
        ...     try:
        ...         raise Answer()
        ...     except Answer as inner:
        ...         raise FileNotFoundError("http://h/a.png") from inner
        ... except FileNotFoundError as outer:
        ...     http_status(outer), http_status(outer.__cause__), http_status(ValueError())
        (403, 403, None)
    """
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for name in ("status", "code", "status_code"):
            value = getattr(current, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
                return value
        current = current.__cause__ or current.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: connection trouble, timeouts, throttling, server errors.

    Args:
        exc: the error a storage call raised.

    Returns:
        True for connection errors, timeouts, transient errno values (EAGAIN, ECONNRESET...) and HTTP 408,
        425, 429 and 5xx answers; False for a missing object, a permission error, another HTTP 4xx answer
        and anything else.

    Example:
        >>> is_transient(ConnectionResetError()), is_transient(FileNotFoundError("a.png"))
        (True, False)
    """
    status = http_status(exc)
    if status is not None:
        return status in _TRANSIENT_HTTP
    if isinstance(exc, _PERMANENT_ERRORS):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if any(cls.__module__.startswith("aiohttp") and cls.__name__ in _HTTP_CONNECTION_ERRORS for cls in type(exc).__mro__):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def retrying(attempt: Callable[[], Any], *, retries: int, backoff_s: float, max_backoff_s: float,
              sleep: Callable[[float], None]) -> Any:
    """`attempt()`, retried on transient errors (`is_transient`) with exponential backoff and jitter.

    Args:
        attempt: the storage call.
        retries: how many times a transient error is retried (0: try once).
        backoff_s: the first wait; it doubles after each failure, with up to 50% random jitter so that
            many threads do not retry in step.
        max_backoff_s: the longest single wait.
        sleep: how to wait (tests pass a recorder).

    Returns:
        What `attempt` returns.

    Raises:
        Exception: a permanent error at once, or the last transient one once the retries are spent.

    Example:
        >>> calls = []
        >>> def flaky():
        ...     calls.append(1)
        ...     if len(calls) < 3:
        ...         raise ConnectionResetError("reset")
        ...     return "done"
        >>> retrying(flaky, retries=4, backoff_s=0.1, max_backoff_s=5.0, sleep=lambda s: None), len(calls)
        ('done', 3)
    """
    for number in range(retries + 1):
        try:
            return attempt()
        except Exception as exc:  # classified below: permanent errors and the last attempt re-raise
            if number == retries or not is_transient(exc):
                raise
            wait = min(max_backoff_s, backoff_s * (2**number))
            sleep(wait * (1 + 0.5 * random.random()))
    raise AssertionError("unreachable: the loop returns or raises")


def resolve_path(value: str, *, base_url: str, allowed_schemes: Tuple[str, ...]) -> str:
    """The URL a manifest entry points at: absolute URLs as given, relative paths joined to `base_url`.

    Args:
        value: the manifest entry: an absolute URL (`s3://b/k.png`), an absolute local path (only when
            `base_url` is local), or a path relative to `base_url`.
        base_url: the folder relative paths are relative to (the manifest's folder by default).
        allowed_schemes: schemes an absolute URL may use; a local absolute path counts as `file`.

    Returns:
        The absolute URL (its scheme lower-cased) or local path to read.

    Raises:
        PathEscapeError: a relative path that leaves `base_url` (via `..`), a scheme not allowed, or an
            absolute local path in a manifest whose base is remote.

    Example:
        >>> resolve_path("ref/a.png", base_url="s3://bucket/set", allowed_schemes=("s3",))
        's3://bucket/set/ref/a.png'
        >>> resolve_path("../../etc/passwd", base_url="/data/set", allowed_schemes=("file",))
        Traceback (most recent call last):
        ...
        ssim_ray.sources.storage.PathEscapeError: path '../../etc/passwd' leaves its base folder '/data/set'
    """
    scheme = url_scheme(value)
    if scheme is not None:
        if scheme not in allowed_schemes:
            raise PathEscapeError(f"URL scheme {scheme!r} of {redact_text(value)!r} is not allowed; allowed: {list(allowed_schemes)}")
        return normalise_url(value)
    base_scheme = url_scheme(base_url) or "file"
    if value.startswith("/"):
        if base_scheme not in _LOCAL_PROTOCOLS or "file" not in allowed_schemes:
            raise PathEscapeError(
                f"absolute path {value!r} is not allowed with base {redact_text(base_url)!r} "
                f"(expected a relative path, or a URL with a scheme in {list(allowed_schemes)})"
            )
        return value
    return _join_inside(value, base_url=base_url)


def _join_inside(value: str, *, base_url: str) -> str:
    """`base_url`/`value`, refusing any result outside `base_url` (checked after normalising `..`)."""
    prefix_match = _SCHEME.match(base_url)
    prefix = prefix_match.group(0) if prefix_match else ""
    base_path = base_url[len(prefix):].rstrip("/")
    if not prefix or prefix in ("file://", "local://"):
        base_path = os.path.abspath(base_path or ".")
    joined = posixpath.normpath(posixpath.join(base_path or "/", value))
    inside = joined.startswith(base_path + "/") if base_path else not joined.startswith("..")
    if not inside or ".." in joined.split("/"):
        raise PathEscapeError(f"path {value!r} leaves its base folder {redact_text(base_url)!r}")
    return prefix + joined
