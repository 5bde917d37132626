"""ssim() hands batches to the fused Triton kernel when SSIM_RAY_TRITON=on, and only then.

Run under Triton's interpreter in a child process (TRITON_INTERPRET is read when kernels are decorated, so it
cannot be switched on inside this process without affecting other tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ssim_ray.metric.structural import ssim

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys
import numpy as np, torch
from ssim_ray.metric.structural import ssim as metric
from ssim_ray.metric import triton_ssim
calls = []
real = triton_ssim.ssim_per_channel_triton
def spy(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
triton_ssim.ssim_per_channel_triton = spy
x = torch.from_numpy(np.load(sys.argv[1])); y = torch.from_numpy(np.load(sys.argv[2]))
scores = metric(x, y, per_channel=True)
_, maps = metric(x, y, return_map=True)  # maps are the torch path's: not routed
print(json.dumps({"scores": scores.tolist(), "calls": len(calls)}))
"""


def _pair(tmp_path):
    import skimage.data

    camera = skimage.data.camera()[200:248, 180:236]
    rng = np.random.default_rng(3)
    noisy = np.clip(camera + rng.normal(0, 12, camera.shape), 0, 255).astype(np.uint8)
    x = np.stack([camera, camera[::-1]])[:, None].copy()
    y = np.stack([noisy, noisy[::-1]])[:, None].copy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return torch.from_numpy(x), torch.from_numpy(y)


def _child(tmp_path, flag: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "SSIM_RAY_TRITON": flag, "SSIM_RAY_COMPILE": "never"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_opt_in_routes_to_the_kernel_within_1e6_of_the_torch_path(tmp_path):
    x, y = _pair(tmp_path)
    torch_path = ssim(x, y, per_channel=True)
    routed = _child(tmp_path, "on")
    assert routed["calls"] == 1
    # Not bitwise: the kernel orders its centred moments differently (see test_triton_interpret.py).
    assert np.max(np.abs(np.array(routed["scores"]) - torch_path.numpy())) <= 1e-6


def test_default_stays_on_the_torch_path(tmp_path):
    x, y = _pair(tmp_path)
    default = _child(tmp_path, "off")
    assert default["calls"] == 0
    assert default["scores"] == ssim(x, y, per_channel=True).tolist()
