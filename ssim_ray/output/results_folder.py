"""A folder ssim.parquet (a merge above `merge.SINGLE_FILE_MAX_ROWS` rows): where its files are written, how it
is published, and what killed merges left behind. Local disk: staged in a hidden folder and renamed into
place; object stores: written in place, stale files removed at the end.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from typing import Any, List, Optional, Sequence

from ssim_ray.output.layout import MERGED_FILE, SUMMARY_FILE, is_local
from ssim_ray.output.publish import is_temp_name

_STAGING_MARK = ".merging-"  # .ssim.parquet.merging-<pid>-<hex>: a folder being written (local disk)


class ResultsFolder:
    """Where a folder ssim.parquet is written, and its publication.

    Local disk: the files go into a hidden folder beside the target (`.ssim.parquet.merging-<pid>-<hex>`),
    renamed over the target once complete (the previous ssim.parquet, file or folder, is moved aside first and
    then removed): readers see the previous results or the new ones, except between the two renames, when
    there is none (and no summary.json). Object stores have no rename: `prepare` deletes summary.json and a
    file ssim.parquet, the files are written in place (each published whole when closed), and `commit`
    removes files of an earlier merge that this one did not write; until then there is no summary.json.
    """

    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root
        self.target = f"{root}/{MERGED_FILE}"
        self.local = is_local(fs)
        self.path = _staging_name(root) if self.local else self.target

    def prepare(self) -> None:
        """Make the folder ready for the blocks' files (before any is written)."""
        if self.local:
            os.makedirs(self.path)
            return
        if self.fs.exists(f"{self.root}/{SUMMARY_FILE}"):
            self.fs.rm(f"{self.root}/{SUMMARY_FILE}")
        if self.fs.isfile(self.target):
            self.fs.rm(self.target)

    def commit(self, names: Sequence[str]) -> None:
        """Publish the folder holding exactly `names`."""
        if self.local:
            swap_in(self.fs, self.root, self.path)
            return
        self.fs.invalidate_cache(self.target)
        stale = [p for p in self.fs.ls(self.target, detail=False) if posixpath.basename(p) not in set(names)]
        if stale:
            self.fs.rm(stale)

    def discard(self) -> None:
        """Throw away a local folder being written (object stores: the files stay, without a summary.json)."""
        if self.local:
            shutil.rmtree(self.path, ignore_errors=True)


def _staging_name(root: str) -> str:
    return f"{root}/.{MERGED_FILE}{_STAGING_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def swap_in(fs: Any, root: str, staging: Optional[str]) -> None:
    """Local disk: move the current ssim.parquet aside, rename `staging` (if any) over it, remove the old one."""
    target = f"{root}/{MERGED_FILE}"
    old = None
    if os.path.lexists(target):
        old = _staging_name(root)
        os.replace(target, old)
    if staging is not None:
        os.replace(staging, target)
    descriptor = os.open(root, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the renames are still atomic
    finally:
        os.close(descriptor)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def remove_stale_staging(fs: Any, root: str) -> List[str]:
    """Remove what killed merges left being written beside ssim.parquet: folders of a parallel merge, and
    staged files (`publish.temp_name`). Local disk only; call under the output's claim.

    Example:
        >>> import fsspec, tempfile
        >>> remove_stale_staging(fsspec.filesystem("file"), tempfile.mkdtemp())
        []
    """
    if not is_local(fs) or not os.path.isdir(root):
        return []
    prefix = f".{MERGED_FILE}"
    stale = [f"{root}/{name}" for name in os.listdir(root)
             if name.startswith(prefix) and (name.startswith(prefix + _STAGING_MARK) or is_temp_name(name))]
    for path in stale:
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return stale
