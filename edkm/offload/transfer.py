"""Byte copies between the compute device and host memory, synchronous or on a side stream.

The offload hooks move whole storages as flat ``uint8`` buffers; this module only copies bytes.
Two engines share one interface:

- :class:`SyncTransfer` (CPU, FakeTensors): a plain ``copy_`` each way. On a CPU-only machine
  "host" and "device" are both the CPU, and the copy still goes into a separate storage, so the
  hooks' bookkeeping is exercised everywhere.
- :class:`CudaTransfer`: copies on a side stream so they overlap compute. Device-to-host: the
  side stream first waits for the compute stream (the tensor must be finished), then copies into
  pinned memory; ``record_stream`` keeps the caching allocator from reusing the device block
  until the copy has read it. Host-to-device: the buffer is allocated on the compute stream, the
  side stream waits for work already queued there (that block may have been in use), copies,
  and records an event; the compute stream waits for that event only when the tensor is
  actually used (:meth:`CudaTransfer.wait`), so a prefetch overlaps the backward in between.

Example:
    >>> import torch
    >>> src = torch.arange(8, dtype=torch.uint8)
    >>> eng = SyncTransfer()
    >>> host = eng.alloc_host(8, pin=False)
    >>> eng.to_host(src, host)
    >>> buf, ready = eng.to_device(host, src.device)
    >>> eng.wait(ready); buf.tolist() == src.tolist()
    True
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CudaTransfer", "SyncTransfer", "transfer_for"]


class SyncTransfer:
    """Synchronous copies (CPU and FakeTensors)."""

    def alloc_host(
        self, nbytes: int, *, pin: bool, host: torch.device | str = "cpu"
    ) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=host, pin_memory=pin)

    def to_host(self, src: torch.Tensor, host: torch.Tensor) -> None:
        host.copy_(src)

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        buf = torch.empty(host.numel(), dtype=torch.uint8, device=device)
        buf.copy_(host)
        return buf, None

    def wait(self, ready: Any) -> None:
        """Make the current stream wait until a buffer from :meth:`to_device` is complete."""

    def release(self, buf: torch.Tensor, ready: Any) -> None:
        """Called when the hooks drop a device buffer (no pending work on CPU)."""


class CudaTransfer(SyncTransfer):
    """Copies on one side stream per device (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def to_host(self, src: torch.Tensor, host: torch.Tensor) -> None:
        compute = torch.cuda.current_stream(src.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            host.copy_(src, non_blocking=host.is_pinned())
        src.record_stream(self.stream)

    def to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Any]:
        compute = torch.cuda.current_stream(device)
        buf = torch.empty(host.numel(), dtype=torch.uint8, device=device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            buf.copy_(host, non_blocking=host.is_pinned())
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return buf, ready

    def wait(self, ready: Any) -> None:
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)

    def release(self, buf: torch.Tensor, ready: Any) -> None:
        # A prefetched buffer dropped unused may still be written by the side stream: let the
        # compute stream (which owns the block) wait, so the allocator cannot hand it out early.
        self.wait(ready)


_SYNC = SyncTransfer()


def transfer_for(
    device: torch.device, engines: dict[torch.device, CudaTransfer], *, fake: bool
) -> SyncTransfer:
    """The engine for tensors on ``device``: a cached side-stream engine for real CUDA tensors.

    Example:
        >>> transfer_for(torch.device("cpu"), {}, fake=False) is _SYNC
        True
    """
    if device.type != "cuda" or fake:
        return _SYNC
    engine = engines.get(device)
    if engine is None:
        engine = engines[device] = CudaTransfer(device)
    return engine
