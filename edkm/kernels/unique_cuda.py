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

__all__ = ["MIN_GROUP", "available", "compile_cubin", "histogram", "scatter", "self_check"]

# LUT groups with fewer weights than this flush the 128 KiB window more than once per 32 K
# weights: the per-weight Triton kernels are cheaper there.
MIN_GROUP = 1 << 15
WINDOW_BYTES = 32768 * 4
THREADS = 1024

_SOURCE = r"""
#define WINDOW 32768

__device__ __forceinline__ unsigned int round_bf16(unsigned int x) {
  // fp32 bits -> bf16 pattern, ties to even; NaN -> 0x7FC0 (PyTorch's cast)
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (unsigned int)(((unsigned long long)x + 0x7FFFull + ((x >> 16) & 1u)) >> 16) & 0xFFFFu;
}

__device__ __forceinline__ float half_bits(unsigned int h, int kind) {
  // a 16-bit gradient as fp32: kind 1 bf16, 2 fp16
  if (kind == 1) return __uint_as_float(h << 16);
  unsigned short s = (unsigned short)h;
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s));
  return f;
}

// the 16-bit pattern of weight i (fp32 weights rounded to bf16)
__device__ __forceinline__ unsigned int pattern1(const void* w, long long i, int fp32) {
  return fp32 ? round_bf16(((const unsigned int*)w)[i]) : ((const unsigned short*)w)[i];
}

// the patterns of weights 4v .. 4v+3 (one 8 B or 16 B load; the caller checked alignment)
__device__ __forceinline__ void pattern4(const void* w, long long v, int fp32, unsigned int p[4]) {
  if (fp32) {
    uint4 q = ((const uint4*)w)[v];
    p[0] = round_bf16(q.x); p[1] = round_bf16(q.y); p[2] = round_bf16(q.z); p[3] = round_bf16(q.w);
  } else {
    uint2 q = ((const uint2*)w)[v];
    p[0] = q.x & 0xFFFFu; p[1] = q.x >> 16; p[2] = q.y & 0xFFFFu; p[3] = q.y >> 16;
  }
}

// upstream gradient i as fp32: kind 0 fp32, 1 bf16, 2 fp16
__device__ __forceinline__ float grad1(const void* g, long long i, int kind) {
  return kind == 0 ? ((const float*)g)[i] : half_bits(((const unsigned short*)g)[i], kind);
}

__device__ __forceinline__ void grad4(const void* g, long long v, int kind, float x[4]) {
  if (kind == 0) {
    float4 q = ((const float4*)g)[v];
    x[0] = q.x; x[1] = q.y; x[2] = q.z; x[3] = q.w;
  } else {
    uint2 q = ((const uint2*)g)[v];
    x[0] = half_bits(q.x & 0xFFFFu, kind); x[1] = half_bits(q.x >> 16, kind);
    x[2] = half_bits(q.y & 0xFFFFu, kind); x[3] = half_bits(q.y >> 16, kind);
  }
}

// shared-memory slot of a pattern (sign bit -> bit 14, low 14 bits kept), -1 outside the window
__device__ __forceinline__ int window_slot(unsigned int p) {
  return ((p & 0x7FFFu) < 0x4000u) ? (int)(((p >> 1) & 0x4000u) | (p & 0x3FFFu)) : -1;
}

__device__ __forceinline__ unsigned int slot_pattern(int s) {
  return ((unsigned int)(s & 0x4000) << 1) | (unsigned int)(s & 0x3FFF);
}

__device__ __forceinline__ void count(unsigned int* counts, int* table, unsigned int p) {
  int s = window_slot(p);
  if (s >= 0) atomicAdd(&counts[s], 1u);
  else atomicAdd(&table[p], 1);
}

__device__ __forceinline__ void add(float* sums, float* table, unsigned int p, float v) {
  int s = window_slot(p);
  if (s >= 0) atomicAdd(&sums[s], v);
  else atomicAdd(&table[p], v);
}

// The block's range of the n weights: [lo, hi). Each LUT-group segment [lo, stop) of it is
// read as an aligned middle of 4-weight vectors [a0, a1) (when `aligned`) and scalar ends.
#define SEGMENTS_BEGIN                                                                       \
  long long per = (n + gridDim.x - 1) / gridDim.x;                                           \
  long long lo = min(n, (long long)blockIdx.x * per);                                        \
  long long hi = min(n, lo + per);                                                           \
  const long long step = blockDim.x;                                                         \
  while (lo < hi) {                                                                          \
    long long grp = lo / group_elems;                                                        \
    long long stop = min(hi, (grp + 1) * group_elems);                                       \
    long long a0 = aligned ? min(stop, (lo + 3) & ~3LL) : stop;                              \
    long long a1 = aligned ? a0 + ((stop - a0) & ~3LL) : stop;

#define SEGMENTS_END                                                                         \
    lo = stop;                                                                               \
  }

extern "C" __global__ void __launch_bounds__(1024)
edkm_histogram_window(const void* w, int* hist, long long n, long long group_elems, int fp32,
                      int aligned) {
  extern __shared__ unsigned int counts[];
  for (int s = threadIdx.x; s < WINDOW; s += blockDim.x) counts[s] = 0u;
  __syncthreads();
  SEGMENTS_BEGIN
    int* table = hist + grp * 65536;
    for (long long i = lo + threadIdx.x; i < a0; i += step) count(counts, table, pattern1(w, i, fp32));
    for (long long i = a1 + threadIdx.x; i < stop; i += step) count(counts, table, pattern1(w, i, fp32));
    long long v = a0 / 4 + threadIdx.x;
    const long long v1 = a1 / 4;
    for (; v + 3 * step < v1; v += 4 * step) {  // 4 vectors in flight per thread
      unsigned int p[4][4];
#pragma unroll
      for (int u = 0; u < 4; ++u) pattern4(w, v + u * step, fp32, p[u]);
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int k = 0; k < 4; ++k) count(counts, table, p[u][k]);
    }
    for (; v < v1; v += step) {
      unsigned int p[4];
      pattern4(w, v, fp32, p);
#pragma unroll
      for (int k = 0; k < 4; ++k) count(counts, table, p[k]);
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
  SEGMENTS_END
}

extern "C" __global__ void __launch_bounds__(1024)
edkm_scatter_window(const void* w, const void* g, float* out, long long n, long long group_elems,
                    int fp32, int kind, int aligned) {
  extern __shared__ float sums[];
  for (int s = threadIdx.x; s < WINDOW; s += blockDim.x) sums[s] = 0.0f;
  __syncthreads();
  SEGMENTS_BEGIN
    float* table = out + grp * 65536;
    for (long long i = lo + threadIdx.x; i < a0; i += step)
      add(sums, table, pattern1(w, i, fp32), grad1(g, i, kind));
    for (long long i = a1 + threadIdx.x; i < stop; i += step)
      add(sums, table, pattern1(w, i, fp32), grad1(g, i, kind));
    long long v = a0 / 4 + threadIdx.x;
    const long long v1 = a1 / 4;
    for (; v + step < v1; v += 2 * step) {  // 2 vectors of weights and gradients in flight
      unsigned int p[2][4];
      float x[2][4];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        pattern4(w, v + u * step, fp32, p[u]);
        grad4(g, v + u * step, kind, x[u]);
      }
#pragma unroll
      for (int u = 0; u < 2; ++u)
#pragma unroll
        for (int k = 0; k < 4; ++k) add(sums, table, p[u][k], x[u][k]);
    }
    for (; v < v1; v += step) {
      unsigned int p[4];
      float x[4];
      pattern4(w, v, fp32, p);
      grad4(g, v, kind, x);
#pragma unroll
      for (int k = 0; k < 4; ++k) add(sums, table, p[k], x[k]);
    }
    __syncthreads();
    for (int s = threadIdx.x; s < WINDOW; s += blockDim.x) {
      float x = sums[s];
      if (x != 0.0f) {
        atomicAdd(&table[slot_pattern(s)], x);
        sums[s] = 0.0f;
      }
    }
    __syncthreads();
  SEGMENTS_END
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
        optin = getattr(props, "shared_memory_per_block_optin", None)
        if optin is None:  # older PyTorch: every sm_80+ GPU opts in to >= 163 KiB per block
            return int(props.major) >= 8
        return int(optin) >= WINDOW_BYTES
    except (OSError, RuntimeError):
        return False


@functools.cache
def self_check(device_index: int) -> str:
    """Run both kernels once on ``device_index`` against ``torch.bincount`` / fp64
    ``index_add_`` (two LUT groups, weights inside and outside the window, unaligned tails);
    "" when they agree, else why not. Cached: the first call per device pays ~10 ms (plus the
    NVRTC compile); ``unique_triton`` uses the window kernels only after it passed.

    Example:
        >>> self_check(0)  # doctest: +SKIP
        ''
    """
    try:
        dev = torch.device("cuda", device_index)
        gen = torch.Generator().manual_seed(0)
        for wdt, gdt in ((torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)):
            w = torch.randn(6, 40_001, generator=gen) * 0.02
            w.view(-1)[::9] *= 300.0
            w.view(-1)[1::7] = 0.0
            w = w.to(wdt).to(dev)
            g = torch.randn(6, 40_001, generator=gen).to(gdt).to(dev)
            w16 = w.view(torch.int16).to(torch.int64) & 0xFFFF
            rows = (w16.view(2, -1) + torch.arange(2, device=dev).view(2, 1) * (1 << 16)).view(-1)
            counts = torch.bincount(rows, minlength=2 << 16).view(2, -1)
            if not torch.equal(histogram(w, 2).long(), counts):
                return f"histogram differs from torch.bincount ({wdt} weights)"
            gd = g.reshape(-1).double()
            truth = torch.zeros(2 << 16, dtype=torch.float64, device=dev).index_add_(0, rows, gd)
            scale = torch.zeros_like(truth).index_add_(0, rows, gd.abs())
            err = (scatter(g, w, 2).reshape(-1).double() - truth).abs()
            if bool((err > 1e-5 * scale + 1e-30).any()):
                return f"scatter-add differs from index_add_ by {err.max().item():.3e} ({gdt})"
        torch.cuda.synchronize(dev)
        return ""
    except (OSError, RuntimeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


def _launch(name: str, device: torch.device, n: int, args: list[object]) -> None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _functions(index)[name]
    blocks = max(1, min(torch.cuda.get_device_properties(index).multi_processor_count, n))
    keep = [
        ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args
    ]  # the argument values must stay alive until the launch returns
    params = (ctypes.c_void_p * len(keep))(*[ctypes.addressof(k) for k in keep])  # type: ignore[arg-type]
    stream = ctypes.c_void_p(torch.cuda.current_stream(index).cuda_stream)
    with torch.cuda.device(index):  # the module lives in this device's context
        code = _driver().cuLaunchKernel(
            fn, blocks, 1, 1, THREADS, 1, 1, WINDOW_BYTES, stream, params, None
        )
    _check_cu(code, name)


def _weight_args(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, int, int, int]:
    w = weight.contiguous()
    n = w.numel()
    if w.element_size() not in (2, 4):
        raise ValueError(f"the window kernels take 16- or 32-bit weights, got {w.dtype}")
    return w, n, max(1, n // groups), int(w.dtype == torch.float32)


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether 4-element vector loads are aligned (8 B for 16-bit, 16 B for 32-bit values)."""
    return all(t.data_ptr() % (4 * t.element_size()) == 0 for t in tensors)


def histogram(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """(G, 65536) int32 count of each pattern (``TorchBins.histogram``), on CUDA."""
    hist = torch.zeros((groups, 1 << 16), dtype=torch.int32, device=weight.device)
    w, n, per_group, fp32 = _weight_args(weight, groups)
    if n:
        args = [
            w, hist, ctypes.c_longlong(n), ctypes.c_longlong(per_group), ctypes.c_int(fp32),
            ctypes.c_int(_aligned(w)),
        ]  # fmt: skip
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
            ctypes.c_int(_GRAD_KIND[g.dtype]), ctypes.c_int(_aligned(w, g)),
        ]  # fmt: skip
        _launch("edkm_scatter_window", w.device, n, args)
    return out
