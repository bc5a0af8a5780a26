"""CUDA C kernels for the histogram and scatter-add passes: a block-private window of the table
in shared memory, flushed to the global table once per block.

Why CUDA C beside the Triton kernels: the two passes need per-weight atomics into a block's
own shared memory (what CUB's ``DeviceHistogram`` does for small bin counts), and Triton
exposes none. Triton 3.6 lowers ``tl.histogram`` to warp ballots (cost grows with the number
of bins: 65,536 bins are out of reach), later releases to shared-memory atomics over at most a
few thousand bins, and neither takes weights (a scatter-add is a weighted histogram). PyTorch's
``bincount`` / ``histc`` privatise in shared memory only up to 48 KiB of bins and
``index_add_`` issues one global atomic per element. So the kernels below are compiled at run
time with NVRTC (the runtime compiler shipped with PyTorch's CUDA wheels, ``nvidia-cuda-nvrtc``)
and launched through the CUDA driver API with ``ctypes``; nothing is built at install time.

The window: the 32,768 patterns whose magnitude bits are below ``0x4000`` (|value| < 2 in bf16
and fp16: every trained LLM weight but a handful) live in 128 KiB of shared memory as int32
counts or fp32 sums; a weight outside it goes straight to a global atomic. Each block owns one
contiguous range of the weights (one block per SM) and flushes its window's nonzero rows into
the (G, 65536) table at the end of the range and at every LUT-group boundary inside it. The
result is exact for every input (histograms bit-exact, sums in fp32 like ``index_add_``);
only the speed depends on the weights' spread. LUT groups smaller than ``MIN_GROUP`` weights
would flush the window too often: callers use the Triton kernels for them.

The pure-PyTorch reference is ``edkm.kernels.unique.TorchBins``; the tests hold these kernels to
it on CUDA, and check on CPU that the source compiles whenever NVRTC is installed.

Example:
    >>> import torch
    >>> w = torch.randn(64, 64, device="cuda").bfloat16()  # doctest: +SKIP
    >>> histogram(w, 1).sum().item()  # doctest: +SKIP
    4096
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os

import torch

__all__ = ["MIN_GROUP", "available", "compile_cubin", "histogram", "scatter"]

# LUT groups with fewer weights than this flush the 128 KiB window more than once per 32 K
# weights: the per-weight Triton kernels are cheaper there.
MIN_GROUP = 1 << 15
WINDOW_BYTES = 32768 * 4
THREADS = 1024

_SOURCE = r"""
#define WINDOW 32768
#define UNROLL 4

// 16-bit pattern of weight i: the bits of a 16-bit weight, or an fp32 weight rounded to bf16
// (ties to even; NaN -> 0x7FC0, as PyTorch's cast)
__device__ __forceinline__ unsigned int pattern16(const void* w, long long i, int fp32) {
  if (fp32) {
    unsigned int x = ((const unsigned int*)w)[i];
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
    unsigned long long r = ((unsigned long long)x + 0x7FFFull + ((x >> 16) & 1u)) >> 16;
    return (unsigned int)r & 0xFFFFu;
  }
  return ((const unsigned short*)w)[i];
}

// upstream gradient i as fp32: kind 0 fp32, 1 bf16, 2 fp16
__device__ __forceinline__ float grad_value(const void* g, long long i, int kind) {
  if (kind == 0) return ((const float*)g)[i];
  unsigned short h = ((const unsigned short*)g)[i];
  if (kind == 1) return __uint_as_float(((unsigned int)h) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

// shared-memory slot of a pattern (sign bit -> bit 14, low 14 bits kept), -1 outside the window
__device__ __forceinline__ int window_slot(unsigned int p) {
  return ((p & 0x7FFFu) < 0x4000u) ? (int)(((p >> 1) & 0x4000u) | (p & 0x3FFFu)) : -1;
}

__device__ __forceinline__ unsigned int slot_pattern(int s) {
  return ((unsigned int)(s & 0x4000) << 1) | (unsigned int)(s & 0x3FFF);
}

// the block's range [lo, hi) of the n weights, split at LUT-group boundaries
__device__ __forceinline__ void block_range(long long n, long long* lo, long long* hi) {
  long long per = (n + gridDim.x - 1) / gridDim.x;
  *lo = min(n, (long long)blockIdx.x * per);
  *hi = min(n, *lo + per);
}

extern "C" __global__ void __launch_bounds__(1024)
edkm_histogram_window(const void* w, int* hist, long long n, long long group_elems, int fp32) {
  extern __shared__ unsigned int counts[];
  long long lo, hi;
  block_range(n, &lo, &hi);
  for (int s = threadIdx.x; s < WINDOW; s += blockDim.x) counts[s] = 0u;
  __syncthreads();
  while (lo < hi) {
    long long g = lo / group_elems;
    long long stop = min(hi, (g + 1) * group_elems);
    int* table = hist + g * 65536;
    long long i = lo + threadIdx.x;
    const long long step = blockDim.x;
    for (; i + (UNROLL - 1) * step < stop; i += UNROLL * step) {
      unsigned int p[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) p[u] = pattern16(w, i + u * step, fp32);
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        int s = window_slot(p[u]);
        if (s >= 0) atomicAdd(&counts[s], 1u);
        else atomicAdd(&table[p[u]], 1);
      }
    }
    for (; i < stop; i += step) {
      unsigned int p = pattern16(w, i, fp32);
      int s = window_slot(p);
      if (s >= 0) atomicAdd(&counts[s], 1u);
      else atomicAdd(&table[p], 1);
    }
    __syncthreads();
    for (int s = threadIdx.x; s < WINDOW; s += blockDim.x) {
      unsigned int c = counts[s];
      if (c) {
        atomicAdd(&table[slot_pattern(s)], (int)c);
        counts[s] = 0u;
      }
    }
    __syncthreads();
    lo = stop;
  }
}

extern "C" __global__ void __launch_bounds__(1024)
edkm_scatter_window(const void* w, const void* g, float* out, long long n, long long group_elems,
                    int fp32, int grad_kind) {
  extern __shared__ float sums[];
  long long lo, hi;
  block_range(n, &lo, &hi);
  for (int s = threadIdx.x; s < WINDOW; s += blockDim.x) sums[s] = 0.0f;
  __syncthreads();
  while (lo < hi) {
    long long grp = lo / group_elems;
    long long stop = min(hi, (grp + 1) * group_elems);
    float* table = out + grp * 65536;
    long long i = lo + threadIdx.x;
    const long long step = blockDim.x;
    for (; i + (UNROLL - 1) * step < stop; i += UNROLL * step) {
      unsigned int p[UNROLL];
      float v[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        p[u] = pattern16(w, i + u * step, fp32);
        v[u] = grad_value(g, i + u * step, grad_kind);
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        int s = window_slot(p[u]);
        if (s >= 0) atomicAdd(&sums[s], v[u]);
        else atomicAdd(&table[p[u]], v[u]);
      }
    }
    for (; i < stop; i += step) {
      unsigned int p = pattern16(w, i, fp32);
      float v = grad_value(g, i, grad_kind);
      int s = window_slot(p);
      if (s >= 0) atomicAdd(&sums[s], v);
      else atomicAdd(&table[p], v);
    }
    __syncthreads();
    for (int s = threadIdx.x; s < WINDOW; s += blockDim.x) {
      float v = sums[s];
      if (v != 0.0f) {
        atomicAdd(&table[slot_pattern(s)], v);
        sums[s] = 0.0f;
      }
    }
    __syncthreads();
    lo = stop;
  }
}
"""

_KERNELS = ("edkm_histogram_window", "edkm_scatter_window")


# ---- NVRTC and the driver API through ctypes --------------------------------------------------


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    """The NVRTC library: ``$EDKM_NVRTC``, else by soname, else from the ``nvidia`` wheels."""
    names = [os.environ.get("EDKM_NVRTC", ""), "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        names += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")), reverse=True)
    for name in names:
        if name and "builtins" not in name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise OSError("NVRTC (libnvrtc.so, from the nvidia-cuda-nvrtc wheel) was not found")


def _check_nvrtc(lib: ctypes.CDLL, code: int, what: str) -> None:
    if code != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC {what} failed: {lib.nvrtcGetErrorString(code).decode()}")


def compile_cubin(arch: str) -> bytes:
    """The kernels above as a cubin for ``arch`` (e.g. ``"90"``), compiled by NVRTC.

    Example:
        >>> len(compile_cubin("90")) > 0  # doctest: +SKIP
        True
    """
    lib = _nvrtc()
    prog = ctypes.c_void_p()
    src = _SOURCE.encode()
    _check_nvrtc(
        lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"edkm_window.cu", 0, None, None),
        "create",
    )  # fmt: skip
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"--std=c++17"]
        res = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if res != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile the window kernels:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        _check_nvrtc(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib, lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def _driver() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check_cu(code: int, what: str) -> None:
    if code != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(code, ctypes.byref(msg))
        raise RuntimeError(f"CUDA {what} failed: {(msg.value or b'?').decode()}")


@functools.cache
def _functions(device_index: int) -> dict[str, ctypes.c_void_p]:
    """Kernel handles loaded into ``device_index``'s primary context (the one PyTorch uses)."""
    with torch.cuda.device(device_index):
        torch.cuda.current_stream().synchronize()  # makes PyTorch's context current here
        major, minor = torch.cuda.get_device_capability(device_index)
        image = compile_cubin(f"{major}{minor}")
        cu = _driver()
        module = ctypes.c_void_p()
        _check_cu(cu.cuModuleLoadData(ctypes.byref(module), image), "module load")
        out = {}
        for name in _KERNELS:
            fn = ctypes.c_void_p()
            _check_cu(cu.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), name)
            # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: the window is above 48 KiB
            _check_cu(cu.cuFuncSetAttribute(fn, 8, WINDOW_BYTES), "shared memory opt-in")
            out[name] = fn
        return out


def available(device: torch.device | str = "cuda") -> bool:
    """Whether the window kernels can run on ``device`` (CUDA, NVRTC found, enough shared
    memory per block).

    Example:
        >>> available("cpu")
        False
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        _nvrtc()
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return int(getattr(props, "shared_memory_per_block_optin", 0)) >= WINDOW_BYTES
    except (OSError, RuntimeError):
        return False


def _launch(name: str, device: torch.device, n: int, args: list[object]) -> None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _functions(index)[name]
    blocks = max(1, min(torch.cuda.get_device_properties(index).multi_processor_count, n))
    keep = [
        ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args
    ]  # the argument values must stay alive until the launch returns
    params = (ctypes.c_void_p * len(keep))(*[ctypes.addressof(k) for k in keep])  # type: ignore[arg-type]
    stream = ctypes.c_void_p(torch.cuda.current_stream(index).cuda_stream)
    _check_cu(
        _driver().cuLaunchKernel(
            fn, blocks, 1, 1, THREADS, 1, 1, WINDOW_BYTES, stream, params, None
        ),
        name,
    )


def _weight_args(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, int, int, int]:
    w = weight.contiguous()
    n = w.numel()
    if w.element_size() not in (2, 4):
        raise ValueError(f"the window kernels take 16- or 32-bit weights, got {w.dtype}")
    return w, n, max(1, n // groups), int(w.dtype == torch.float32)


def histogram(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(G, 65536) int32 count of each pattern (``TorchBins.histogram``), on CUDA."""
    hist = torch.zeros((groups, 1 << 16), dtype=torch.int32, device=weight.device)
    w, n, per_group, fp32 = _weight_args(weight, groups)
    if n:
        args = [w, hist, ctypes.c_longlong(n), ctypes.c_longlong(per_group), ctypes.c_int(fp32)]
        _launch("edkm_histogram_window", w.device, n, args)
    return hist


_GRAD_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def scatter(grad: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(G, 65536) fp32 sum of ``grad`` over each pattern's weights (``TorchBins.scatter``)."""
    out = torch.zeros((groups, 1 << 16), dtype=torch.float32, device=weight.device)
    w, n, per_group, fp32 = _weight_args(weight, groups)
    g = grad.contiguous()
    if g.dtype not in _GRAD_KIND:
        g = g.float()
    if n:
        args = [
            w, g, out, ctypes.c_longlong(n), ctypes.c_longlong(per_group), ctypes.c_int(fp32),
            ctypes.c_int(_GRAD_KIND[g.dtype]),
        ]  # fmt: skip
        _launch("edkm_scatter_window", w.device, n, args)
    return out
