"""Peak tensor memory of a call, by category: CPU, FakeTensor (never allocated) and CUDA.

:func:`peak_memory` runs a callable once and returns a :class:`PeakMemory`:

- ``method="memtracker"`` (CPU tensors) and ``"memtracker-fake"`` (the call runs under an
  active ``FakeTensorMode``, so full-size layers are measured without being allocated): PyTorch's
  ``MemTracker`` (``torch.distributed._tools.mem_tracker``) sees every storage the call creates
  and files it as Parameter, Buffer, Gradient, Activation, Temp, ...; storages that already exist
  are counted once you pass them (or their modules) in ``track``. Host copies made by
  :class:`edkm.offload.hooks.OffloadHooks` are filed in a separate ``"Host"`` category (the hooks
  announce them through ``host_copy_observers``), and ``peak_bytes`` is the peak of everything
  else, i.e. device memory, even when host and device are both the CPU.
- ``method="cuda"``: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
  (pinned host copies are not in it); ``peak_host_bytes`` is not known there (None) — read the
  hooks' own stats.

Example:
    >>> import torch
    >>> w = torch.ones(1024, requires_grad=True)
    >>> rep = peak_memory(lambda: (w * 2).sum().backward(), track=[w])
    >>> rep.peak_bytes >= 2 * 4096, rep.method
    (True, 'memtracker')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["PeakMemory", "peak_memory"]

HOST = "Host"


@dataclasses.dataclass
class PeakMemory:
    """Result of :func:`peak_memory` (bytes).

    Attributes:
        method: "memtracker", "memtracker-fake" or "cuda".
        device: the device measured.
        peak_bytes: peak device memory during the call (host copies excluded).
        by_category: device bytes per category at that peak (MemTracker methods only).
        peak_host_bytes: peak of the host copies filed apart (None under "cuda").
        start_bytes: device bytes tracked when the call started.
        result: what the callable returned.
    """

    method: str
    device: str
    peak_bytes: int
    by_category: dict[str, int]
    peak_host_bytes: int | None
    start_bytes: int
    result: Any = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("result")
        return out


def _tracker_class() -> type:
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _UpdateType

    class _HostAwareTracker(MemTracker):  # type: ignore[misc]
        """MemTracker that files announced host copies apart and keeps a device-only peak."""

        def __init__(self) -> None:
            super().__init__()
            self.device_peak: dict[Any, int] = {}
            self.device_peak_snap: dict[Any, dict[str, int]] = {}
            self.host_peak: dict[Any, int] = {}

        def _track(self, reftype: Any, t: torch.Tensor) -> None:
            from edkm.offload.hooks import allocating_host

            if allocating_host[0]:
                reftype = HOST
                dev = self._curr_mem_snap.setdefault(t.device, dict.fromkeys(self._ref_class, 0))
                dev.setdefault(HOST, 0)
                dev.setdefault(_TOTAL_KEY, 0)
            super()._track(reftype, t)

        def mark_host(self, t: torch.Tensor) -> None:
            self._track(HOST, t)  # make sure the storage is known
            winfo, _ = self._WINFO.get(t.untyped_storage(), (None, None))
            if winfo is None or winfo.reftype == HOST:
                return
            old = winfo.reftype
            dev = self._curr_mem_snap.setdefault(winfo.device, dict.fromkeys(self._ref_class, 0))
            dev.setdefault(HOST, 0)
            winfo.reftype = HOST
            self._update_snap(_UpdateType.REF, winfo, old_reftype=old)
            self._update_peak_stats(None)

        def _update_peak_stats(self, peak_state: Any) -> None:
            if peak_state is not None:
                super()._update_peak_stats(peak_state)
            for dev, snap in self._curr_mem_snap.items():
                host = snap.get(HOST, 0)
                dev_bytes = snap[_TOTAL_KEY] - host
                self.host_peak[dev] = max(self.host_peak.get(dev, 0), host)
                if dev_bytes > self.device_peak.get(dev, -1):
                    self.device_peak[dev] = dev_bytes
                    self.device_peak_snap[dev] = {
                        str(getattr(k, "value", k)): v
                        for k, v in snap.items()
                        if k not in (HOST, _TOTAL_KEY) and v
                    }

    return _HostAwareTracker


def peak_memory(
    fn: Callable[[], Any],
    *,
    track: Iterable[nn.Module | torch.Tensor] = (),
    device: str | torch.device | None = None,
) -> PeakMemory:
    """Run ``fn()`` once and measure its peak tensor memory (see the module docstring).

    Args:
        fn: the call to measure (e.g. a forward and backward).
        track: modules and tensors that exist before the call and count towards the peak
            (weights, inputs); MemTracker methods only.
        device: "cuda" measures with the CUDA allocator statistics; None or "cpu" with
            MemTracker (inside an active ``FakeTensorMode`` this is ``"memtracker-fake"``).

    Example:
        >>> lin = nn.Linear(256, 256)
        >>> rep = peak_memory(lambda: lin(torch.randn(8, 256)).sum().backward(), track=[lin])
        >>> rep.by_category["Parameter"], rep.peak_bytes > rep.start_bytes
        (263168, True)
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return PeakMemory("cuda", str(dev), peak, {}, None, start, result)

    from torch._guards import active_fake_mode

    from edkm.offload.hooks import host_copy_observers

    tracker = _tracker_class()()
    items = list(track)
    if items:
        tracker.track_external(*items)
    host_copy_observers.append(tracker.mark_host)
    try:
        with tracker:
            tracker._update_peak_stats(None)
            start = sum(
                snap.get("Total", 0) - snap.get(HOST, 0) for snap in tracker._curr_mem_snap.values()
            )
            result = fn()
    finally:
        host_copy_observers.remove(tracker.mark_host)
    cpu = [d for d in tracker.device_peak if torch.device(d).type != "cuda"] or list(
        tracker.device_peak
    )
    peak = sum(tracker.device_peak[d] for d in cpu)
    cats: dict[str, int] = {}
    for d in cpu:
        for k, v in tracker.device_peak_snap.get(d, {}).items():
            cats[k] = cats.get(k, 0) + v
    host = sum(tracker.host_peak.get(d, 0) for d in cpu)
    method = "memtracker-fake" if active_fake_mode() is not None else "memtracker"
    return PeakMemory(method, "cpu", peak, cats, host, start, result)
