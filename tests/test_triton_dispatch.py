"""ssim() hands batches to the fused Triton kernel when asked to (kernel='triton'), and only then; and the
library leaves os.environ as it found it, through a compiled and an interpreted call.

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

from ssim_ray.metric import ssim

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, os, sys
import numpy as np, torch
kernel, compiled_call = sys.argv[3], sys.argv[4] == "compiled"
if compiled_call:  # torch.compile sets its own variables (TORCHINDUCTOR_CACHE_DIR...) on first use: not ours
    torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
environ = dict(os.environ)
from ssim_ray.metric import kernel_in_use, ssim as metric
from ssim_ray.metric.triton import launcher
calls = []
real = launcher.ssim_per_channel_triton
def spy(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)
launcher.ssim_per_channel_triton = spy
x = torch.from_numpy(np.load(sys.argv[1])); y = torch.from_numpy(np.load(sys.argv[2]))
scores = metric(x, y, per_channel=True, kernel=kernel, compile="never")
try:  # maps are the torch path's: never routed, and kernel='triton' refuses them
    metric(x, y, return_map=True, kernel=kernel, compile="never")
    maps = "scored"
except ValueError as exc:
    maps = str(exc)
if compiled_call:
    metric(x, y, kernel="torch", compile="always")
print(json.dumps({"scores": scores.tolist(), "calls": len(calls), "maps": maps,
                  "environ_unchanged": dict(os.environ) == environ,
                  "in_use": kernel_in_use("cpu", kernel=kernel, compile="always" if compiled_call else "never")}))
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


def _child(tmp_path, kernel: str, *, compiled_call: bool = False) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = [str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), kernel, "compiled" if compiled_call else "eager"]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_opt_in_routes_to_the_kernel_within_1e6_of_the_torch_path(tmp_path):
    x, y = _pair(tmp_path)
    torch_path = ssim(x, y, per_channel=True)
    routed = _child(tmp_path, "triton")
    assert routed["calls"] == 1
    assert routed["in_use"] == "triton"
    # Not bitwise: the kernel orders its centred moments differently (see test_triton_interpret.py).
    assert np.max(np.abs(np.array(routed["scores"]) - torch_path.numpy())) <= 1e-6
    assert "return_map=True: the kernel keeps no SSIM maps" in routed["maps"]


@pytest.mark.parametrize("kernel", ["auto", "torch"])
def test_default_and_torch_stay_on_the_torch_path(tmp_path, kernel):
    x, y = _pair(tmp_path)
    default = _child(tmp_path, kernel)
    assert default["calls"] == 0
    assert default["scores"] == ssim(x, y, per_channel=True).tolist()
    assert default["maps"] == "scored"
    assert default["in_use"] == "torch-eager"


def test_the_library_leaves_os_environ_alone(tmp_path):
    """The compile policy and the kernel are arguments: nothing is read from or written to the environment
    (the process set-up of an actor is the job's business, tests/test_layering.py)."""
    _pair(tmp_path)
    state = _child(tmp_path, "triton", compiled_call=True)
    assert state["calls"] == 1
    assert state["environ_unchanged"] is True


def test_the_compiled_call_really_compiled(tmp_path):
    """The environment test above means something only if its torch call ran the compiled kernel."""
    _pair(tmp_path)
    state = _child(tmp_path, "torch", compiled_call=True)
    assert state["in_use"] == "torch-compiled"
    assert state["environ_unchanged"] is True
