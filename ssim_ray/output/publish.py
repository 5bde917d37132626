"""Atomic publication of the merged outputs: a reader (or a kill) never sees a half-written file where a
whole one was.

`ssim.parquet`, `summary.json`, `_run.json`, `report.html` and the plots are written through a
`StagedFile`, which publishes the new content only once it is complete:

- local disk: a hidden temporary file beside the target (`.<name>.tmp-<pid>-<random>`), flushed and fsynced,
  then `os.replace`d over the target (atomic on POSIX), and the folder fsynced;
- S3, GCS, Azure (their fsspec files upload in parts and publish the object when closed): the target is
  written directly and published by `close`; a failure calls `discard` (an aborted multipart upload), so the
  previous object stays;
- any other store (memory://, …): the content is buffered and written with one `pipe_file` at the end.

A SIGKILL between two publications can leave the new `ssim.parquet` beside the previous `summary.json`
(the merge deletes `summary.json` just before publishing, see `merge`); a whole file is never replaced by
a part of one. Part files and markers do not need this: the marker is the commit (see `commit`).
"""

from __future__ import annotations

import io
import os
import posixpath
import uuid
from typing import Any, BinaryIO, Optional

from ssim_ray.output.layout import ensure_folder, is_local

# fsspec stores whose write handles upload as they go and publish the object only when closed.
_STREAMING_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "az", "adl")
_TEMP_MARK = ".tmp-"


def _protocols(fs: Any) -> tuple:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _replace(source: str, target: str) -> None:
    """`os.replace`, named so that a test can make the last step of a publication fail."""
    os.replace(source, target)


def temp_name(path: str) -> str:
    """The hidden temporary name a local publication of `path` writes first (unique per call).

    Example:
        >>> temp_name("/out/ssim.parquet").startswith("/out/.ssim.parquet.tmp-")
        True
    """
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}{_TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(name: str) -> bool:
    """Whether a file name is one `temp_name` makes (a publication a kill interrupted leaves it behind).

    Example:
        >>> is_temp_name(".ssim.parquet.tmp-123-abcd1234"), is_temp_name("ssim.parquet")
        (True, False)
    """
    return name.startswith(".") and _TEMP_MARK in name


class StagedFile:
    """A new version of one file, written in full before it replaces the old one.

    Write to `handle`, then `commit()` to publish, or `discard()` to leave the old file as it was. Used as a
    context manager it commits when the block succeeds and discards when it raises.

    Example:
        >>> import fsspec
        >>> fs = fsspec.filesystem("memory")
        >>> with StagedFile(fs, "/doc-publish/a.txt") as staged:
        ...     _ = staged.handle.write(b"whole")
        >>> fs.cat_file("/doc-publish/a.txt")
        b'whole'
    """

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path = fs, path
        self._temp: Optional[str] = None
        self._buffer: Optional[io.BytesIO] = None
        self.done = False
        if is_local(fs):
            ensure_folder(fs, posixpath.dirname(path))
            self._temp = temp_name(path)
            self.handle: BinaryIO = open(self._temp, "xb")
        elif set(_protocols(fs)) & set(_STREAMING_PROTOCOLS):
            self.handle = fs.open(path, "wb")
        else:
            self._buffer = io.BytesIO()
            self.handle = self._buffer

    def commit(self) -> None:
        """Publish what was written: from now on readers see the new file, whole."""
        if self.done:
            raise ValueError(f"a staged file is committed or discarded once, got a second call for {self.path}")
        self.done = True
        if self._temp is not None:
            try:
                self.handle.flush()
                os.fsync(self.handle.fileno())
                self.handle.close()
                _replace(self._temp, self.path)
            except BaseException:
                self._remove_temp()
                raise
            _fsync_folder(posixpath.dirname(self.path))
        elif self._buffer is not None:
            self.fs.pipe_file(self.path, self._buffer.getvalue())
        else:
            self.handle.close()

    def discard(self) -> None:
        """Throw the new content away; the previous file (if any) stays as it was."""
        if self.done:
            return
        self.done = True
        if self._temp is not None:
            self._remove_temp()
        elif self._buffer is None:
            # fsspec's buffered files publish on close, and close when garbage-collected: abort the upload
            # and mark the handle closed so that nothing publishes the partial content later.
            self.handle.discard()
            self.handle.closed = True

    def _remove_temp(self) -> None:
        self.handle.close()
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "StagedFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (a power cut after it must not bring back the old name)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(descriptor)


def publish_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write a whole file so that readers see either the previous content or `data`, never a part of it.

    Args:
        fs: an fsspec filesystem.
        path: the file.
        data: its whole new content.

    Example:
        >>> import os, tempfile, fsspec
        >>> folder = tempfile.mkdtemp()
        >>> publish_bytes(fsspec.filesystem("file"), f"{folder}/summary.json", b"{}")
        >>> os.listdir(folder)
        ['summary.json']
    """
    with StagedFile(fs, path) as staged:
        staged.handle.write(data)
