"""ssim()'s `kernel=` and `compile=`: validated like every option, 'triton' refuses with its reasons instead of
handing a call silently to the torch path, `kernel_in_use` says which kernel runs, and no module of the metric
touches the environment (the choice is an argument, never a variable read on every batch).

This process imports triton (where installed) compiled for CUDA and has no GPU, so the Triton kernel serves
nothing here; tests/test_triton_dispatch.py routes calls to it under the interpreter.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from ssim_ray import ssim
from ssim_ray.config import SSIMConfig
from ssim_ray.metric import COMPILE_POLICIES, KERNELS, kernel_in_use
from ssim_ray.metric.triton import kernels as triton_kernels
from ssim_ray.metric.triton import launcher

METRIC = pathlib.Path(__file__).resolve().parents[1] / "ssim_ray" / "metric"
REFUSED = r"kernel='triton' cannot score this call: "


def noise(*shape: int, dtype: torch.dtype = torch.uint8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) * 255).to(dtype)


X, Y = noise(2, 3, 24, 30, seed=1), noise(2, 3, 24, 30, seed=2)


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("option, choices", [("kernel", KERNELS), ("compile", COMPILE_POLICIES)])
@pytest.mark.parametrize("value", [1, True, None, ["torch"]])
def test_options_of_the_wrong_type_are_type_errors(option, choices, value):
    with pytest.raises(TypeError, match=rf"{option} must be a str, one of {re.escape(str(list(choices)))}, got "):
        ssim(X, Y, **{option: value})
    with pytest.raises(TypeError, match=rf"{option} must be a str"):
        kernel_in_use("cpu", **{option: value})


@pytest.mark.parametrize("option, value", [("kernel", "cuda"), ("kernel", "Triton"), ("kernel", ""),
                                           ("compile", "on"), ("compile", "ALWAYS"), ("compile", "jit")])
def test_unknown_choices_are_value_errors(option, value):
    with pytest.raises(ValueError, match=rf"{option} must be one of .* got {value!r}"):
        ssim(X, Y, **{option: value})
    with pytest.raises(ValueError, match=rf"{option} must be one of .* got {value!r}"):
        kernel_in_use("cpu", **{option: value})


@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("compile_policy", ["auto", "never"])
def test_every_torch_choice_gives_the_same_bits(kernel, compile_policy):
    """'auto' is the torch path for now; the compile policy is speed only (compiled bits: test_ssim_invariance)."""
    chosen = ssim(X, Y, per_channel=True, kernel=kernel, compile=compile_policy)
    assert torch.equal(chosen, ssim(X, Y, per_channel=True))


@pytest.mark.parametrize("device, error", [(3, TypeError), (None, TypeError), ("gpu0", ValueError)])
def test_kernel_in_use_validates_the_device(device, error):
    with pytest.raises(error, match="device must"):
        kernel_in_use(device)


def test_kernel_in_use_validates_the_metric_options_too():
    with pytest.raises(ValueError, match="precision must be one of"):
        kernel_in_use("cpu", precision="fp16")
    with pytest.raises(ValueError, match="positive odd integer, got 4"):
        kernel_in_use("cpu", win_size=4)


def test_the_config_offers_the_same_choices():
    assert (SSIMConfig().kernel, SSIMConfig().compile) == ("auto", "auto")
    with pytest.raises(ValueError, match=r"ssim.kernel must be one of \['auto', 'torch', 'triton'\], got 'cuda'"):
        SSIMConfig(kernel="cuda")
    with pytest.raises(ValueError, match=r"ssim.compile must be one of \['auto', 'always', 'never'\], got 'yes'"):
        SSIMConfig(compile="yes")


# ----------------------------------------------------------------------------------- triton refuses, loudly


@pytest.fixture
def compiled_triton():
    """This process's triton: installed, and compiling for CUDA (not interpreting, which serves CPU tensors)."""
    pytest.importorskip("triton", reason="triton is only installed on Linux x86-64 (see pyproject's test extra)")
    if launcher.triton_interpreted():
        pytest.skip("TRITON_INTERPRET=1 for the whole run: the kernel serves CPU tensors here")


def test_cpu_tensors_are_refused_naming_the_device(compiled_triton):
    with pytest.raises(ValueError, match=REFUSED + r"the tensors are on cpu: the compiled kernel needs CUDA"):
        ssim(X, Y, kernel="triton")


@pytest.mark.parametrize("options, reason", [
    ({"precision": "fp64"}, r"precision='fp64': the kernel computes in float32"),
    ({"return_map": True}, r"return_map=True: the kernel keeps no SSIM maps"),
    ({"win_size": 13}, r"win_size=13: the kernel's window has at most 11 taps"),
])
def test_options_the_kernel_cannot_serve_are_named(compiled_triton, options, reason):
    with pytest.raises(ValueError, match=REFUSED + r".*" + reason):
        ssim(noise(2, 3, 24, 30), noise(2, 3, 24, 30, seed=3), kernel="triton", **options)


def test_float64_pixels_are_refused_but_float32_after_downsampling_are_not(compiled_triton):
    x, y = X.double(), Y.double()
    with pytest.raises(ValueError, match=REFUSED + r".*pixels of dtype float64: the kernel reads uint8, uint16"):
        ssim(x, y, data_range=255.0, kernel="triton")
    with pytest.raises(ValueError) as refused:  # downsampled to float32 first: only the device is wrong here
        ssim(x, y, data_range=255.0, kernel="triton", downsample="wang")
    assert "dtype" not in str(refused.value) and "the tensors are on cpu" in str(refused.value)


def test_a_batch_over_the_grid_limit_is_refused(compiled_triton):
    x = torch.zeros(launcher.MAX_BATCH + 1, 1, 11, 11, dtype=torch.uint8)
    limit = r".*65536 pairs in one batch: the kernel's grid takes at most 65535"
    with pytest.raises(ValueError, match=REFUSED + limit):
        ssim(x, x, kernel="triton")


def test_every_reason_is_given_at_once(compiled_triton):
    with pytest.raises(ValueError) as refused:
        ssim(X.double(), Y.double(), data_range=255.0, kernel="triton", precision="fp64", return_map=True)
    for reason in ("the tensors are on cpu", "precision='fp64'", "return_map=True", "pixels of dtype float64"):
        assert reason in str(refused.value)


def test_empty_batches_and_ragged_lists_are_refused_too(compiled_triton):
    with pytest.raises(ValueError, match=REFUSED):
        ssim(X[:0], Y[:0], kernel="triton")
    with pytest.raises(ValueError, match=REFUSED):
        ssim([X[0], X[1, :, :20]], [Y[0], Y[1, :, :20]], kernel="triton")


def test_without_triton_the_refusal_says_so(monkeypatch):
    monkeypatch.setattr(triton_kernels, "triton", None)
    with pytest.raises(ValueError, match=REFUSED + r"triton is not installed"):
        ssim(X, Y, kernel="triton")
    with pytest.raises(ValueError, match=REFUSED + r"triton is not installed"):
        kernel_in_use("cuda", kernel="triton")


# ------------------------------------------------------------------------------------------ kernel_in_use


def test_kernel_in_use_on_cpu_follows_the_compile_policy():
    # A window no other test uses: its compiled kernel has not been built in this process.
    window = {"win_size": 5, "sigma": 0.75}
    assert kernel_in_use("cpu", kernel="torch", compile="never", **window) == "torch-eager"
    assert kernel_in_use("cpu", compile="auto", **window) == "torch-eager"  # before 3 s of eager work
    assert kernel_in_use("cpu", compile="always", **window) == "torch-compiled"  # compiles on first use
    ssim(X, Y, compile="auto", **window)
    assert kernel_in_use("cpu", compile="auto", **window) == "torch-eager"


def test_kernel_in_use_off_the_cpu_is_eager_torch():
    assert kernel_in_use(torch.device("meta")) == kernel_in_use("cuda", compile="always") == "torch-eager"


def test_kernel_in_use_for_triton_refuses_as_ssim_does(compiled_triton):
    with pytest.raises(ValueError, match=REFUSED + r"the tensors are on cpu"):
        kernel_in_use("cpu", kernel="triton")
    with pytest.raises(ValueError, match=REFUSED + r".*precision='fp64'"):
        kernel_in_use("cuda", kernel="triton", precision="fp64")
    if torch.cuda.is_available():
        assert kernel_in_use("cuda", kernel="triton") == "triton"
    else:
        with pytest.raises(ValueError, match=REFUSED + r"CUDA is not available on this machine"):
            kernel_in_use("cuda", kernel="triton")


# -------------------------------------------------------------------------------------- no hidden state


@pytest.mark.parametrize("path", sorted(METRIC.rglob("*.py")), ids=lambda p: str(p.relative_to(METRIC)))
def test_no_module_of_the_metric_mentions_the_environment(path):
    """Kernel and compile policy are arguments; the only variable that matters, TRITON_INTERPRET, is
    Triton's own and is seen through the kernel object (tests/test_layering.py reads the syntax tree)."""
    text = path.read_text()
    assert not re.search(r"os\.environ|getenv|putenv|unsetenv|SSIM_RAY_", text), path
