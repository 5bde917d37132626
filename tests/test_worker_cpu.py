"""A CPU actor's process set-up changes how fast ssim runs, never what it returns.

`process_setup.configure_cpu_compute` fixes torch's threads and keeps large blocks in glibc's heap. Each
configuration runs in its own process: the scores of real photo pairs must have the same bits either way,
and the compiled kernel (C through ctypes) must let other Python threads run while it computes - an actor's
decode threads. The actor's compile decision is its own attribute, passed to ssim() as `compile=`, never an
environment variable.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

_SCORE_PAIRS = r"""
import io, json, sys, threading, time
import numpy as np, torch
from PIL import Image, ImageFilter
from skimage import data
from ssim_ray.process_setup import configure_cpu_compute

if sys.argv[1] == "1":
    configure_cpu_compute(torch_threads=1)
else:
    torch.set_num_threads(1)
from ssim_ray.metric import ssim

def jpeg(pixels, quality):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer))

rng = np.random.RandomState(5)
astronaut = data.astronaut()[:320, :384]
coffee = data.coffee()[:320, :384]
pairs = [
    (astronaut, jpeg(astronaut, 30)),
    (astronaut, np.clip(astronaut + 12 * rng.randn(*astronaut.shape), 0, 255).astype(np.uint8)),
    (coffee, np.asarray(Image.fromarray(coffee).filter(ImageFilter.GaussianBlur(1.5)))),
]
x = torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1) for a, _ in pairs])
y = torch.stack([torch.from_numpy(np.array(b)).permute(2, 0, 1) for _, b in pairs])
batched = ssim(x, y, per_channel=True, compile="always").flatten().tolist()
alone = [v for i in range(len(pairs))
         for v in ssim(x[i : i + 1], y[i : i + 1], per_channel=True, compile="always").flatten().tolist()]
runners = sys.modules["ssim_ray.metric.compiled"]
compiled = [k.compiled is not None and k.failed is None for k in runners._kernels.values()]

# A Python thread counts while the main thread runs the compiled kernel over every tile of a bigger batch in
# one call (~0.3-1 s): with the GIL held through the call it could count only at the call's edges.
from ssim_ray.metric import native, tiles
from ssim_ray.metric.window import gaussian_window_1d
planes_x, planes_y = (t.repeat(24, 1, 1, 1).reshape(-1, 320, 384) for t in (x, y))
grid = tiles.tile_grid(320, 384, 11)
rows, cols = tiles.tile_extents(planes_x.shape[0], grid, planes_x.device)
planes = native.planes_of(planes_x, planes_y, grid.rows, grid.cols, grid.slots, grid.across)
taps = torch.tensor(tiles.taps_in(gaussian_window_1d(11, 1.5), torch.float32))
consts = torch.tensor([6.5025, 58.5225])
counted, stop = [0], threading.Event()
def count():
    while not stop.is_set():
        counted[0] += 1
counter = threading.Thread(target=count)
counter.start()
time.sleep(0.05)
solo = counted[0]
time.sleep(0.2)
solo_rate = (counted[0] - solo) / 0.2
start = counted[0]
t0 = time.perf_counter()
native.tile_sums(native.library(5), planes, 0, len(rows), rows, cols, consts, taps, 0)
scoring_s = time.perf_counter() - t0
during = counted[0] - start
time.sleep(0.2)
stop.set()
counter.join()
print(json.dumps({"batched": [v.hex() for v in batched], "alone": [v.hex() for v in alone],
                  "compiled": compiled, "counted_during_scoring": during, "scoring_s": scoring_s,
                  "solo_rate": solo_rate}))
"""


def _start_scoring(actor_setup: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SCORE_PAIRS, "1" if actor_setup else "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})


def _scores(run: subprocess.Popen) -> dict:
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_the_actor_set_up_gives_the_same_bits_and_leaves_the_gil_to_other_threads():
    # Two processes side by side (each one thread, each loading its own kernel): neither sees the other.
    runs = _start_scoring(True), _start_scoring(False)
    try:
        actor, default = _scores(runs[0]), _scores(runs[1])
    finally:
        for run in runs:
            run.kill()  # a no-op once it has exited: none is left running after a failure or a timeout
    # Both really ran the compiled kernel (a failed build would fall back to the eager kernel and make the
    # comparison empty).
    assert actor["compiled"] == default["compiled"] == [True]
    assert actor["batched"] == default["batched"]
    assert actor["alone"] == actor["batched"]  # batch-invariant in the actor's set-up too
    assert len(default["batched"]) == 9  # three RGB pairs, per channel
    # The counting thread ran while the kernel did, at a good share of its own rate (through ctypes.PyDLL,
    # which keeps the GIL for the call, it counted only around the call's edges: ~5% of that).
    for run in (actor, default):
        assert run["counted_during_scoring"] > 0.25 * run["solo_rate"] * run["scoring_s"], run


_START_UP = r"""
import json, os, sys
from ssim_ray.config import BatchConfig, SourceConfig, SSIMConfig, SummaryConfig
from ssim_ray.worker import ShardComputer, WorkerSpec

spec = WorkerSpec(source=SourceConfig(kind="sample"), ssim=SSIMConfig(), batch=BatchConfig(), summary=SummaryConfig(),
                  output_url="unused", output_storage_options={}, device="cpu", torch_threads=1, decode_threads=1,
                  memory_share=1.0, expected_pairs=int(sys.argv[1]))
computer = ShardComputer(spec)
compiled_now = computer.warm_up_at_start()
runners = sys.modules["ssim_ray.metric.compiled"]
kernels = [k.compiled is not None and k.failed is None for k in runners._kernels.values()]
print(json.dumps({"compiled_now": compiled_now, "kernels": kernels, "policy": computer.compile_policy,
                  "in_use": computer._kernel_in_use(), "environ": sorted(k for k in os.environ if "SSIM" in k)}))
"""


@pytest.mark.parametrize("expected_pairs, compiles", [(5000, True), (100, False)])
def test_an_actor_with_a_long_queue_compiles_before_its_first_shard(expected_pairs, compiles):
    run = subprocess.run([sys.executable, "-c", _START_UP, str(expected_pairs)], capture_output=True, text=True,
                         timeout=600, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    state = json.loads(run.stdout.strip().splitlines()[-1])
    assert state["compiled_now"] is compiles
    # Compiled before any shard: the kernel exists and ssim() will use it from the first batch on; a short
    # queue leaves ssim's own policy (compile after 3 s of eager work) in charge.
    assert state["kernels"] == ([True] if compiles else [])
    assert state["policy"] == ("always" if compiles else "auto")
    assert state["in_use"] == ("torch-compiled" if compiles else "torch-eager")  # what ShardResult.kernel says
    assert state["environ"] == []


def test_an_actor_refuses_a_kernel_its_device_cannot_run():
    """kernel=triton on a CPU actor fails as the actor starts, with the metric's reason, not pair by pair."""
    from ssim_ray.config import BatchConfig, SourceConfig, SSIMConfig, SummaryConfig
    from ssim_ray.worker import ShardComputer, WorkerSpec

    spec = WorkerSpec(source=SourceConfig(kind="sample"), ssim=SSIMConfig(kernel="triton"), batch=BatchConfig(),
                      summary=SummaryConfig(), output_url="unused", output_storage_options={}, device="cpu",
                      torch_threads=1, decode_threads=1, memory_share=1.0)
    with pytest.raises(ValueError, match=r"kernel='triton' cannot score this call: .*(cpu|triton is not installed)"):
        ShardComputer(spec)
