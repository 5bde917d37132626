"""Provenance stamps written into the output's JSON files: when a file was made, and with which libraries.

Markers, the run manifest and the summary carry `created` (UTC, to the second); the summary also carries the
versions of every library that can change a result, so two summaries can be compared knowing what differed.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
from typing import Dict, Optional

# Distributions whose version can change a score, a decode or the bytes written (name in the summary,
# distribution name).
_VERSIONED = (("torch", "torch"), ("ray", "ray"), ("pyarrow", "pyarrow"), ("fsspec", "fsspec"),
              ("pillow", "pillow"), ("numpy", "numpy"), ("ssim_ray", "ssim_ray"))


def utc_now() -> str:
    """The current UTC time in ISO 8601 to the second, as every `created` field holds it.

    Returns:
        For example '2026-01-31T12:00:00+00:00'.

    Example:
        >>> utc_now().endswith("+00:00")
        True
    """
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def library_versions() -> Dict[str, Optional[str]]:
    """Versions of the libraries that determine results (None for one that is not installed).

    Returns:
        The Python version and each library's version, by name, sorted by name.

    Example:
        >>> sorted(library_versions())[:3]
        ['fsspec', 'numpy', 'pillow']
    """
    versions: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name, dist in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return dict(sorted(versions.items()))
