"""Builds and calls the CPU kernels in C: `tile_kernel.c`, the tile path's arithmetic op for op, and
`plane_kernel.c`, MS-SSIM's halving and PSNR's integer squared-error sums (`plane_passes`).

Why C and not torch.compile (which this path used before): inductor's code for the tile batch was already
near its op count, but around it the path cut every tile into buffers (s = x + y and d = x - y, a copy of
both images per call), computed the masked-out map pixels and each tile's halo rows twice, and paid
dynamo's guards per call; together that was as much time again as the kernel (measured on 16x3x256^2 at one
thread: 1.1 of 2.7 ms per pair). The C kernel reads the planes in their own dtype, forms s and d one row at
a time, skips what the mask drops and shares halo rows down a strip, with the same operations per map
pixel: same bits as the eager kernel (tests/test_ssim_invariance.py), so the compile policy stays a
matter of speed.

A library is built once per (source, defines such as the window's half width, compiler, CPU) with the
system's C compiler (`-O3 -march=native -ffp-contract=off`: no FMA contraction, no -ffast-math) in 0.5-1.5
s, into a per-user cache directory that only that user can write (a shared /tmp must not let another user
place a library this process loads), and loaded with ctypes, which releases the GIL during a call: the
pool's threads run side by side. No compiler, or one that fails, raises `NativeKernelError`; the caller then
uses the eager kernel (same bits) and says so once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Sequence, Tuple

import torch

SOURCE = Path(__file__).with_name("tile_kernel.c")
PLANE_SOURCE = Path(__file__).with_name("plane_kernel.c")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")
ARCH_FLAG = "-march=native"
COMPILERS = ("cc", "gcc", "clang")
PIXEL_CODES = {torch.uint8: 0, torch.uint16: 1, torch.float32: 2, torch.float64: 3}  # tile_kernel.c's PIX_*
SAMPLE_COVARIANCE, WITH_CS, CS_ONLY = 1, 2, 4  # tile_kernel.c's variant bits
_lock = threading.Lock()


class NativeKernelError(RuntimeError):
    """The C kernel could not be built, loaded or run (the eager kernel gives the same bits)."""


class Planes(ctypes.Structure):
    """tile_kernel.c's planes_t: the two (P, H, W) plane stacks of a tile batch and its tile grid."""

    _fields_ = [("x", ctypes.c_void_p), ("y", ctypes.c_void_p),
                ("x_strides", ctypes.c_int64 * 3), ("y_strides", ctypes.c_int64 * 3),
                ("pix", ctypes.c_int32), ("height", ctypes.c_int32), ("width", ctypes.c_int32),
                ("rows", ctypes.c_int32), ("cols", ctypes.c_int32), ("slots", ctypes.c_int32),
                ("across", ctypes.c_int32)]


def cache_dir() -> Path:
    """This user's directory of built kernels: created 0700, refused if it is a link, another user owns it or
    others can write to it."""
    path = Path(tempfile.gettempdir()) / f"ssim_ray_kernels_{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or (hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022)):
        raise NativeKernelError(f"{path} is not this user's own directory (a link, or owner uid {info.st_uid}, mode "
                                f"{oct(info.st_mode & 0o777)}): not loading kernels from it")
    return path


@functools.lru_cache(maxsize=1)
def _compiler() -> str:
    for name in COMPILERS:
        found = shutil.which(name)
        if found:
            return found
    raise NativeKernelError(f"no C compiler found (looked for {', '.join(COMPILERS)} on PATH)")


@functools.lru_cache(maxsize=1)
def _build_identity() -> bytes:
    """What a built library depends on besides its source: the compiler's version and this CPU's features
    (`-march=native`)."""
    try:
        version = subprocess.run([_compiler(), "--version"], capture_output=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeKernelError(f"C compiler {_compiler()} did not run: {exc}") from exc
    cpu = b""
    try:
        with open("/proc/cpuinfo", "rb") as info:
            cpu = b"".join(sorted({line for line in info if line.startswith((b"flags", b"Features", b"model name"))}))
    except OSError:
        pass
    return b"\0".join([version, cpu, platform.machine().encode(), sys.platform.encode()])


def _build(source: Path, defines: Tuple[str, ...], target: Path) -> None:
    """Compile `source` with `defines` into `target` (atomically: concurrent builders of the same library each
    rename a whole file into place)."""
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        for arch in ([ARCH_FLAG], []):  # a compiler without -march=native still builds the portable code
            command = [_compiler(), *FLAGS, *arch, *defines, str(source), "-o", partial]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(partial, target)
                return
        raise NativeKernelError(f"building the C kernel failed: {' '.join(command)}\n{done.stderr.strip()[-2000:]}")
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _load(source: Path, defines: Tuple[str, ...]) -> ctypes.CDLL:
    """`source` built with `defines` (on first use, then from this user's cache) and loaded."""
    with _lock:
        try:
            key = hashlib.sha256(source.read_bytes() + _build_identity() + repr((FLAGS, ARCH_FLAG, defines)).encode())
            target = cache_dir() / f"{source.stem}_{key.hexdigest()[:24]}.so"
            if not target.exists():
                _build(source, defines, target)
            return ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as exc:
            raise NativeKernelError(f"{type(exc).__name__}: {exc}") from exc


@functools.lru_cache(maxsize=None)
def library(half: int) -> ctypes.CDLL:
    """The tile kernel's library for windows of 2 * half + 1 taps."""
    return tile_functions(_load(SOURCE, (f"-DHALF={half}",)), half)


def tile_functions(lib: ctypes.CDLL, half: int) -> ctypes.CDLL:
    """`lib` (a build of tile_kernel.c), checked to be for windows of 2 * half + 1 taps, its functions typed."""
    if lib.ssim_tiles_half() != half:
        raise NativeKernelError(f"{lib._name} was built for another window")
    for name in ("ssim_tiles_f32", "ssim_tiles_f64"):
        function = getattr(lib, name)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.POINTER(Planes), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    return lib


@functools.lru_cache(maxsize=None)
def plane_library() -> ctypes.CDLL:
    """The plane passes' library (plane_kernel.c: MS-SSIM's halving, PSNR's integer squared errors)."""
    lib = _load(PLANE_SOURCE, ())
    strides = ctypes.POINTER(ctypes.c_int64)
    for name in ("halve_f32", "halve_f64"):
        function = getattr(lib, name)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p, ctypes.c_int, strides, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
    lib.square_error_sums.restype = ctypes.c_int
    lib.square_error_sums.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, strides, strides, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def _strides(t: torch.Tensor):
    return (ctypes.c_int64 * 3)(*t.stride())


def halve(lib: ctypes.CDLL, planes: torch.Tensor, outs: Sequence[torch.Tensor], first: int, last: int) -> None:
    """Planes first .. last - 1 of (P, H, W) CPU `planes` (a PIXEL_CODES dtype) halved len(outs) times, level l
    into contiguous `outs[l]` (P, ceil(H / 2^(l+1)), ceil(W / 2^(l+1))), all float32 or all float64, each
    level from the one before: plane_kernel.c's halve."""
    function = lib.halve_f64 if outs[0].dtype == torch.float64 else lib.halve_f32
    pointers = (ctypes.c_void_p * len(outs))(*(out.data_ptr() for out in outs))
    if function(planes.data_ptr(), PIXEL_CODES[planes.dtype], _strides(planes), first, last, planes.shape[1],
                planes.shape[2], len(outs), pointers) != 0:
        raise NativeKernelError("the C halving could not allocate its scratch memory")


def square_error_sums(lib: ctypes.CDLL, x: torch.Tensor, y: torch.Tensor, crop: int, out: torch.Tensor,
                      first: int, last: int) -> None:
    """Into float64 `out[first:last]`: per plane of (P, H, W) uint8 / uint16 CPU x and y, the exact sum of
    (x - y)^2 over the pixels `crop` or more from each side."""
    if lib.square_error_sums(x.data_ptr(), y.data_ptr(), PIXEL_CODES[x.dtype], _strides(x), _strides(y), first, last,
                             x.shape[1], x.shape[2], crop, out[first:].data_ptr()) != 0:
        raise NativeKernelError(f"the C squared-error sums take uint8 or uint16 pixels, not {x.dtype}")


def variant_bits(sample_covariance: bool, with_cs: bool, cs_only: bool) -> int:
    """A `tiles.TileVariant` as tile_kernel.c's variant bits."""
    return (SAMPLE_COVARIANCE if sample_covariance else 0) | (WITH_CS if with_cs else 0) | (CS_ONLY if cs_only else 0)


def planes_of(x: torch.Tensor, y: torch.Tensor, rows: int, cols: int, slots: int, across: int) -> Planes:
    """The planes_t of (P, H, W) CPU plane stacks x and y of one dtype in PIXEL_CODES (kept alive by the caller)."""
    if x.dtype != y.dtype or x.shape != y.shape or x.dim() != 3 or x.dtype not in PIXEL_CODES:
        raise ValueError(f"the C kernel reads same-shape (P, H, W) planes of one dtype of {list(PIXEL_CODES)}, "
                         f"got {x.dtype} {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}")
    return Planes(x.data_ptr(), y.data_ptr(), (ctypes.c_int64 * 3)(*x.stride()), (ctypes.c_int64 * 3)(*y.stride()),
                  PIXEL_CODES[x.dtype], x.shape[1], x.shape[2], rows, cols, slots, across)


def tile_sums(lib: ctypes.CDLL, planes: Planes, start: int, count: int, rows: torch.Tensor, cols: torch.Tensor,
              consts: torch.Tensor, taps: torch.Tensor, variant: int) -> torch.Tensor:
    """(count,) float64 sums of tiles start .. start + count - 1 ((count, 2) with WITH_CS); rows, cols: (count,)
    contiguous int32 extents of those tiles; consts, taps: contiguous, in the compute dtype."""
    out = torch.empty((count, 2) if variant & WITH_CS else (count,), dtype=torch.float64)
    function = lib.ssim_tiles_f64 if consts.dtype == torch.float64 else lib.ssim_tiles_f32
    if function(ctypes.byref(planes), start, count, rows.data_ptr(), cols.data_ptr(), consts.data_ptr(),
                taps.data_ptr(), variant, out.data_ptr()) != 0:
        raise NativeKernelError("the C kernel could not allocate its scratch memory")
    return out


def check_taps(taps: Sequence[float]) -> int:
    """The half width of a symmetric odd window (what the library is built for)."""
    if len(taps) % 2 != 1:
        raise NativeKernelError(f"the C kernel takes odd windows, not {len(taps)} taps")
    return len(taps) // 2
