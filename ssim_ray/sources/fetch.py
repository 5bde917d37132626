"""Fetching one side of a pair, in a worker: where its value points, its bytes and version, and what every
failure becomes; and the rule that no error leaving the sources quotes a credential.

A side is a path or URL (resolved against the manifest's folder), encoded bytes inside the manifest, or
null. Whatever fetching it raises becomes a `PairFailure` with a status and a one-line, redacted message:

| raised                                                  | status               |
| ------------------------------------------------------- | -------------------- |
| null in the manifest, FileNotFoundError, HTTP 404/410   | `missing`            |
| PermissionError, HTTP 401/403                           | `forbidden`          |
| a NUL byte in the value, ENAMETOOLONG                   | `invalid_path`       |
| a path leaving its base folder, a scheme not allowed    | `path_escape`        |
| no filesystem installed (or known) for the scheme       | `unsupported_scheme` |
| IsADirectoryError, NotADirectoryError                   | `unreadable`         |
| anything else (another HTTP 4xx, a backend's own error) | `fetch_error`        |

Two things are not a row's: a fault of the process itself (MemoryError; KeyboardInterrupt and SystemExit
are not Exceptions), and a transient error (connection, timeout, throttling, HTTP 5xx) that outlived
`source.fetch_retries`, raised as `StorageUnavailableError`: an outage would otherwise commit a shard of
rows that a store's bad minute decided, where retrying the shard as a whole recovers them.
"""

from __future__ import annotations

import errno
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple, Union

from ssim_ray import statuses
from ssim_ray.config import SourceConfig
from ssim_ray.secrets import contains_credentials, redact_text
from ssim_ray.sources.decode import describe_bytes
from ssim_ray.sources.model import ManifestError, PairFailure
from ssim_ray.sources.reading import read_versioned, stat_version
from ssim_ray.sources.storage import (
    PathEscapeError, StorageUnavailableError, UnsupportedSchemeError, http_status, is_transient, open_url, resolve_path,
)

# Faults of the process, not of a pair's input: they fail the shard wherever they are raised.
PROCESS_FAULTS = (MemoryError,)


class RedactedSourceError(OSError):
    """An error leaving the sources whose text or causes quoted a credential: its type and message, redacted."""


# Errors whose messages the sources build from redacted names.
_REDACTED_TYPES = (PairFailure, StorageUnavailableError, RedactedSourceError, ManifestError)


@dataclass(frozen=True)
class Fetched:
    """One side's encoded bytes, the name messages call it by, and its version (None for inline bytes)."""

    data: bytes
    name: str
    version: Optional[str]


def fetch_side(value: Union[str, bytes, None], side: str, *, pair_id: str, base_url: Optional[str],
               source: SourceConfig) -> Fetched:
    """The encoded bytes of one side of a pair, with its version; every per-pair failure typed.

    Args:
        value: the manifest's value: a path or URL, encoded bytes, or None.
        side: "reference" or "distorted", for messages.
        pair_id: the pair's id, for messages about inline values.
        base_url: what relative paths are relative to; None for prefix rows (their URLs are listed ones).
        source: the source config (storage options, retries, allowed schemes).

    Returns:
        The bytes, the redacted name and the version (`reading.read_versioned`'s format).

    Raises:
        PairFailure: the side cannot be fetched (status per the table in the module docstring).
        StorageUnavailableError: a transient storage error outlived its retries.
        MemoryError: a fault of the process.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with open(os.path.join(folder, "a.png"), "wb") as handle:
        ...     _ = handle.write(b"PNG?")
        >>> cfg = SourceConfig(kind="parquet", url=folder)
        >>> fetched = fetch_side("a.png", "reference", pair_id="p", base_url=folder, source=cfg)
        >>> fetched.data, fetched.version.startswith("size=4;mtime_ns=")
        (b'PNG?', True)
        >>> fetch_side("gone.png", "distorted", pair_id="p", base_url=folder, source=cfg)
        Traceback (most recent call last):
        ...
        ssim_ray.sources.model.PairFailure: distorted .../gone.png: not found
    """
    if value is None:
        raise PairFailure(statuses.MISSING, f"{side} of pair {pair_id!r} is null in the manifest")
    if isinstance(value, bytes):
        return Fetched(value, f"{describe_bytes(value)} of pair {pair_id!r}", None)
    url = _target(value, side, base_url=base_url, source=source)
    with _typed_failures(side, url, retries=source.fetch_retries):
        fs, path = open_url(url, storage_options=source.storage_options)
        data, version = read_versioned(fs, path, retries=source.fetch_retries)
    return Fetched(data, printable(redact_text(url)), version)


def side_version(value: Union[str, bytes, None], side: str, *, base_url: Optional[str], source: SourceConfig) -> Optional[str]:
    """The version `fetch_side` records for this side, from a stat or HEAD alone: no byte of the image is read.

    Args:
        value: the manifest's value, as for `fetch_side`.
        side: "reference" or "distorted".
        base_url: as for `fetch_side`.
        source: the source config.

    Returns:
        The version string; None for inline bytes, a null, and an input `fetch_side` could not fetch
        (missing, forbidden, an invalid path...), as `LoadedPair` records None for those.

    Raises:
        StorageUnavailableError: a transient storage error outlived its retries.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with open(os.path.join(folder, "a.png"), "wb") as handle:
        ...     _ = handle.write(b"PNG?")
        >>> cfg = SourceConfig(kind="parquet", url=folder)
        >>> side_version("a.png", "reference", base_url=folder, source=cfg) == fetch_side(
        ...     "a.png", "reference", pair_id="p", base_url=folder, source=cfg).version
        True
        >>> side_version("gone.png", "reference", base_url=folder, source=cfg) is None
        True
    """
    if not isinstance(value, str):
        return None
    try:
        url = _target(value, side, base_url=base_url, source=source)
        with _typed_failures(side, url, retries=source.fetch_retries):
            fs, path = open_url(url, storage_options=source.storage_options)
            return stat_version(fs, path, retries=source.fetch_retries)
    except PairFailure:
        return None


class SharedVersions:
    """`side_version` with each distinct input looked up once (one instance per shard): a reference shared by
    many distorted versions costs one stat or HEAD. Threads asking for the same input wait for the first.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with open(os.path.join(folder, "r.png"), "wb") as handle:
        ...     _ = handle.write(b"PNG?")
        >>> versions = SharedVersions(SourceConfig(kind="parquet", url=folder))
        >>> versions("r.png", "reference", base_url=folder) == versions("r.png", "distorted", base_url=folder)
        True
    """

    def __init__(self, source: SourceConfig) -> None:
        self._source = source
        self._known: Dict[Tuple[str, Optional[str]], Future] = {}
        self._lock = threading.Lock()

    def __call__(self, value: Union[str, bytes, None], side: str, *, base_url: Optional[str]) -> Optional[str]:
        if not isinstance(value, str):
            return None
        with self._lock:
            future = self._known.get((value, base_url))
            first = future is None
            if first:
                future = self._known[value, base_url] = Future()
        if first:
            try:
                future.set_result(side_version(value, side, base_url=base_url, source=self._source))
            except BaseException as exc:  # an outage: every row that shares the input raises it too
                future.set_exception(exc)
        return future.result()


def printable(text: str) -> str:
    """`text` with control characters escaped (`\\x00`, `\\n`), so that a message naming it stays one line.

    Example:
        >>> printable("ref\\x00.png"), printable("a\\nb.png"), printable("café.png")
        ('ref\\\\x00.png', 'a\\\\nb.png', 'café.png')
    """
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def error_text(exc: BaseException) -> str:
    """`Type: message` of an exception on one line, control characters escaped, credentials redacted.

    Example:
        >>> error_text(OSError("GET https://h/a.png?X-Amz-Signature=abc\\nfailed"))
        'OSError: GET https://h/a.png?X-Amz-Signature=*** failed'
    """
    text = " ".join(str(exc).split())
    return printable(redact_text(f"{type(exc).__name__}: {text}" if text else type(exc).__name__))


@contextmanager
def redacted_errors() -> Iterator[None]:
    """Around the sources' public entry points: an exception whose text or causes quote a credential leaves
    as a `RedactedSourceError` without causes (Ray prints a task's exception and its causes to the driver
    and to its worker logs); any other passes unchanged.

    Example:
        >>> with redacted_errors():
        ...     raise OSError("403 for https://h/m.parquet?X-Amz-Signature=abc")
        Traceback (most recent call last):
        ...
        ssim_ray.sources.fetch.RedactedSourceError: OSError: 403 for https://h/m.parquet?X-Amz-Signature=***
    """
    try:
        yield
    except Exception as exc:
        if not _quotes_credentials(exc):
            raise
        raise RedactedSourceError(error_text(exc)) from None


def _quotes_credentials(exc: BaseException) -> bool:
    """Whether `exc` or a cause a traceback would print with it quotes a credential. Messages the sources
    built are redacted already (and redacting twice is not a no-op: `=***:` loses its colon)."""
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        built_here = isinstance(current, _REDACTED_TYPES)
        if not built_here and (contains_credentials(str(current)) or contains_credentials(repr(current.args))):
            return True
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return False


def _target(value: str, side: str, *, base_url: Optional[str], source: SourceConfig) -> str:
    """The URL a side's value points at; a value that cannot name a file is this pair's failure."""
    if "\x00" in value:
        raise PairFailure(statuses.INVALID_PATH, f"{side} {printable(redact_text(value))}: a NUL byte cannot be part of a file name")
    if base_url is None:
        return value
    try:
        return resolve_path(value, base_url=base_url, allowed_schemes=tuple(source.allowed_schemes))
    except PathEscapeError as exc:
        raise PairFailure(statuses.PATH_ESCAPE, printable(f"{side}: {exc}")) from None


@contextmanager
def _typed_failures(side: str, url: str, *, retries: int) -> Iterator[None]:
    """Whatever the block raises becomes this side's `PairFailure`, except process faults and outages."""
    try:
        yield
    except PROCESS_FAULTS:
        raise
    except PairFailure:
        raise
    except Exception as exc:
        name = printable(redact_text(url))
        failure = _failure(exc, side=side, name=name)
        if failure is None:
            raise StorageUnavailableError(
                f"{side} {name}: storage unavailable after {retries} retries: {error_text(exc)}"
            ) from None
        raise failure from None


def _failure(exc: Exception, *, side: str, name: str) -> Optional[PairFailure]:
    """The row an exception of fetching makes (see the module docstring); None for an outage."""
    if is_transient(exc):
        return None
    status = http_status(exc)
    where = f"{side} {name}"
    if isinstance(exc, UnsupportedSchemeError):
        return PairFailure(statuses.UNSUPPORTED_SCHEME, f"{where}: {exc}")
    if status in (401, 403) or (status is None and isinstance(exc, PermissionError)):
        return PairFailure(statuses.FORBIDDEN, f"{where}: access denied ({f'HTTP {status}' if status else 'permission denied'})")
    if status in (404, 410) or (status is None and isinstance(exc, FileNotFoundError)):
        return PairFailure(statuses.MISSING, f"{where}: not found")
    if getattr(exc, "errno", None) == errno.ENAMETOOLONG:
        return PairFailure(statuses.INVALID_PATH, f"{where}: file name too long for the filesystem (ENAMETOOLONG)")
    if status is None and isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return PairFailure(statuses.UNREADABLE, f"{where}: {type(exc).__name__}")
    detail = f"HTTP {status}" if status is not None else error_text(exc)
    return PairFailure(statuses.FETCH_ERROR, f"{where}: {detail}")
