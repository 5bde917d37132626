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
