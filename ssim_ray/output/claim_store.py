"""Conditional writes of one small file, per store: what the output's claim (`claim`) is built on.

Four operations, each atomic where the store allows it:

- `create(data)`: write the file only if there is none (a token, or None when one exists);
- `read()`: the content and a token that identifies this version of it (None when there is no file);
- `replace(token, data)`: overwrite only if the file is still the version `token` names (a new token, or
  None when it changed or vanished since);
- `delete(token)`: delete only if the file is still that version (False otherwise).

Local disk: `create` writes a temporary file and hard-links it to the name (`link` fails when the name
exists, and the claim appears whole); `replace` and `delete` compare the content and act under an exclusive
`flock` of the folder. S3: `put_object` with `If-None-Match: *` and `If-Match: <ETag>`, `delete_object`
with `If-Match` (AWS S3 and the moto server honour all three). Other stores: the same sequence without the
guarantee (check, then write): two runs that start in the same instant may both pass there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
from typing import Any, Iterator, Optional, Tuple

import fsspec.asyn

from ssim_ray.output.layout import ensure_folder, is_local, write_bytes
from ssim_ray.output.publish import temp_name

# Errors of `os.link` that mean "this filesystem has no hard links": fall back to O_EXCL.
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS)


class LocalStore:
    """`create` by hard link (exclusive and whole), `replace`/`delete` by content under a folder flock."""

    exclusive = True

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        ensure_folder(fs, posixpath.dirname(path))

    def create(self, data: bytes) -> Optional[bytes]:
        temp = temp_name(self.path)
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, self.path)
        except FileExistsError:
            return None
        except OSError as error:
            if error.errno not in _NO_LINKS:
                raise
            return self._create_exclusive(data)
        finally:
            os.unlink(temp)
        return data

    def _create_exclusive(self, data: bytes) -> Optional[bytes]:
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        return data

    def read(self) -> Optional[Tuple[bytes, bytes]]:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, token: bytes, data: bytes) -> Optional[bytes]:
        with self._locked():
            current = self.read()
            if current is None or current[1] != token:
                return None
            temp = temp_name(self.path)
            with open(temp, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        return data

    def delete(self, token: bytes) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != token:
                return False
            os.unlink(self.path)
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl  # POSIX only; imported here so that the module imports everywhere

        descriptor = os.open(posixpath.dirname(self.path) or ".", os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock


def _precondition_failed(error: BaseException) -> bool:
    """Whether an s3fs error is S3's answer to a condition that did not hold (412, or 409 in a race)."""
    if isinstance(error, FileExistsError):
        return True
    response = getattr(error.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


class S3Store:
    """Conditional PUT and DELETE on S3 (`If-None-Match: *`, `If-Match: <ETag>`), ETags as tokens."""

    exclusive = True

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    def _put(self, data: bytes, **condition: str) -> Optional[str]:
        try:
            response = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)
        except FileNotFoundError:
            if "IfNoneMatch" in condition:
                raise  # no bucket: nothing to claim, and nothing will be written
            return None  # If-Match on a deleted object: it changed
        except OSError as error:
            if _precondition_failed(error):
                return None
            raise
        self.fs.invalidate_cache(self.path)
        return response["ETag"]

    def create(self, data: bytes) -> Optional[str]:
        return self._put(data, IfNoneMatch="*")

    def read(self) -> Optional[Tuple[bytes, str]]:
        async def get() -> Tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await response["Body"].read(), response["ETag"]
            finally:
                response["Body"].close()

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def replace(self, token: str, data: bytes) -> Optional[str]:
        return self._put(data, IfMatch=token)

    def delete(self, token: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except FileNotFoundError:
            return False
        except OSError as error:
            if _precondition_failed(error):
                return False
            raise
        self.fs.invalidate_cache(self.path)
        return True


class GenericStore:
    """Any other fsspec store: check, then write (no guarantee when two runs race in the same instant)."""

    exclusive = False

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path

    def create(self, data: bytes) -> Optional[bytes]:
        self.fs.invalidate_cache(self.path)
        if self.fs.exists(self.path):
            return None
        write_bytes(self.fs, self.path, data)
        return data

    def read(self) -> Optional[Tuple[bytes, bytes]]:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, token: bytes, data: bytes) -> Optional[bytes]:
        current = self.read()
        if current is None or current[1] != token:
            return None
        write_bytes(self.fs, self.path, data)
        return data

    def delete(self, token: bytes) -> bool:
        current = self.read()
        if current is None or current[1] != token:
            return False
        self.fs.rm(self.path)
        return True


def claim_store(fs: Any, path: str) -> Any:
    """The conditional-write store for one file `path` of filesystem `fs` (LocalStore, S3Store, GenericStore).

    Example:
        >>> import fsspec
        >>> store = claim_store(fsspec.filesystem("memory"), "/doc-claim-store/_claim.json")
        >>> token = store.create(b"a")
        >>> store.create(b"b") is None, store.replace(b"stale", b"c") is None, store.replace(token, b"d") is not None
        (True, True, True)
    """
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if is_local(fs):
        return LocalStore(fs, path)
    if "s3" in protocols or "s3a" in protocols:
        return S3Store(fs, path)
    return GenericStore(fs, path)
