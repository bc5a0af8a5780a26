"""Peak tensor memory of a call: by category on CPU, under FakeTensorMode, and on a GPU.

One helper, :func:`measure_peak`, answers "how much device memory does this step need?" the same
way in tests and benchmarks:

- **CUDA**: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (what the
  caching allocator handed out; host memory, pinned or not, is not in it).
- **CPU**: PyTorch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``), which sees every
  tensor storage created while the call runs and files it under a category (parameter, buffer,
  gradient, activation, temporary, optimizer state). It works on FakeTensors too: run the call
  inside ``FakeTensorMode`` to measure layers far too big to allocate (method
  ``"memtracker-fake"``).

On a CPU-only machine the offload hooks' "host" is the CPU as well, so host copies would be
counted as device memory. The offloader allocates its host buffers inside
:func:`edkm.offload.host.host_allocation`; the tracker files every storage created there (and every later tensor
viewing one) in a separate host pool: ``peak_bytes`` excludes it and ``peak_host_bytes`` reports
it. Under CUDA, host copies are not device memory anyway and ``peak_host_bytes`` is None.

Example:
    >>> import torch
    >>> w = torch.ones(1 << 10)
    >>> rep = measure_peak(lambda: (w * 2).sum(), existing=[w])
    >>> rep.baseline_bytes, rep.peak_bytes >= rep.baseline_bytes + 4096
    (4096, True)
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from edkm.offload.host import in_host_allocation

__all__ = [
    "MemoryReport",
    "measure_peak",
]


@dataclasses.dataclass
class MemoryReport:
    """Peak tensor memory of one call.

    Attributes:
        device: the device measured (``"cpu"`` or ``"cuda:0"``).
        method: ``"cuda"`` (allocator statistics), ``"memtracker"`` (real CPU tensors) or
            ``"memtracker-fake"`` (FakeTensors: shapes measured, nothing allocated).
        peak_bytes: peak device tensor bytes while the call ran, ``existing`` tensors included.
        baseline_bytes: device tensor bytes alive when the call started (the ``existing``
            tensors on CPU; everything allocated on the GPU).
        by_category: the device bytes per MemTracker category at the peak (CPU only).
        peak_host_bytes: peak bytes of the offload host pool (CPU only; None on CUDA).
    """

    device: str
    method: str
    peak_bytes: int
    baseline_bytes: int
    by_category: dict[str, int] = dataclasses.field(default_factory=dict)
    peak_host_bytes: int | None = None

    @property
    def delta_bytes(self) -> int:
        """Peak above the baseline: the memory the call itself needed."""
        return self.peak_bytes - self.baseline_bytes

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["delta_bytes"] = self.delta_bytes
        return out


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
        return [s for a in attrs for s in _storages(getattr(t, a))]
    return [t.untyped_storage()]


_TRACKER_CLASS: type | None = None


class _NoHook:
    def remove(self) -> None:
        pass


_NO_HOOK = _NoHook()


def _tracker_class() -> type:
    """A MemTracker that files host-pool storages apart (built lazily: torch.distributed)."""
    global _TRACKER_CLASS
    if _TRACKER_CLASS is not None:
        return _TRACKER_CLASS
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.weak import WeakIdKeyDictionary

    class HostAwareTracker(MemTracker):
        def __init__(self) -> None:
            super().__init__()
            self.host_storages = WeakIdKeyDictionary()
            self.host_bytes = 0
            self.peak_host_bytes = 0

        def _free_host(self, nbytes: int, _ref: object) -> None:
            self.host_bytes -= nbytes

        def _track(self, reftype: Any, t: torch.Tensor) -> None:
            # A view of a host buffer (made on unpack) is host memory too, created inside the
            # host block or not; only storages new to the tracker and created inside it are new
            # host memory.
            sts = _storages(t)
            known = [st in self.host_storages for st in sts]
            if any(known) or (in_host_allocation() and st_new(self, sts)):
                for st in sts:
                    if st in self.host_storages:
                        continue
                    nbytes = st.nbytes()
                    # keep the weakref alive in the dict; its callback releases the bytes
                    self.host_storages[st] = weakref.ref(st, _release(self, nbytes))
                    self.host_bytes += nbytes
                    self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
                return
            super()._track(reftype, t)

        def _update_and_maybe_create_winfos(
            self, t: torch.Tensor, reftype: Any, update_existing: bool = False
        ) -> set[Any]:
            # MemTracker files every optimizer's state (and each gradient) here after the
            # fact; state kept in the host pool (HostOffloadAdamW) is host memory, not device
            if t is None or any(st in self.host_storages for st in _storages(t)):
                return set()
            return super()._update_and_maybe_create_winfos(t, reftype, update_existing)

        def _track_module_params_and_buffers(
            self, module: nn.Module, install_grad_hooks: bool = True
        ) -> tuple[int, int]:
            # MemTracker hooks every parameter's gradient, which torch refuses for a frozen
            # one (a model trained in part): a no-op handle marks those as hooked already
            for p in module.parameters():
                if not p.requires_grad and p not in self._param_to_grad_hook_handles:
                    self._param_to_grad_hook_handles[p] = (_NO_HOOK, _NO_HOOK)
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state: Any) -> None:
            # MemTracker walks every module's statistics after every op (quadratic in the
            # model's depth: minutes for a 32-layer model); measure_peak reads the global
            # peak only, so only that is kept up to date
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)

        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            # MemTracker refuses a second forward of a top-level module (several training
            # steps or micro-batches in one call); its per-module statistics are not what is
            # read here, so they start over and the global peak carries on
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents == {"Global"}:
                    self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

    def st_new(tracker: Any, sts: list[torch.UntypedStorage]) -> bool:
        return all(tracker._WINFO.get(st) is None for st in sts)

    def _release(tracker: Any, nbytes: int) -> Callable[[object], None]:
        return lambda ref: tracker._free_host(nbytes, ref)

    _TRACKER_CLASS = HostAwareTracker
    return HostAwareTracker


def _existing_tensors(existing: Iterable[torch.Tensor | nn.Module]) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for item in existing:
        if isinstance(item, nn.Module):
            tensors.extend(item.parameters())
            tensors.extend(item.buffers())
        else:
            tensors.append(item)
    return tensors


def _unique_nbytes(tensors: list[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        for st in _storages(t):
            # the StorageImpl address is stable while ``tensors`` keeps it alive; data_ptr
            # would be meaningless for FakeTensors.
            if st._cdata not in seen:
                seen.add(st._cdata)
                total += st.nbytes()
    return total


def measure_peak(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    existing: Iterable[torch.Tensor | nn.Module] = (),
) -> MemoryReport:
    """Run ``fn()`` once and report its peak device tensor memory (module docstring).

    Args:
        fn: the call to measure (e.g. a forward plus backward).
        device: ``"cpu"`` (MemTracker; call inside ``FakeTensorMode`` for fake tensors) or a
            CUDA device (allocator statistics).
        existing: tensors and modules alive before the call that it uses (weights, inputs):
            on CPU they are tracked from the start, so they count in the peak and make the
            baseline. On CUDA everything allocated already counts.

    Returns:
        A :class:`MemoryReport`.

    Example:
        >>> x = torch.zeros(256)
        >>> measure_peak(lambda: x + 1, existing=[x]).peak_bytes
        2048
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return MemoryReport(
            device=str(device),
            method="cuda",
            peak_bytes=int(torch.cuda.max_memory_allocated(device)),
            baseline_bytes=int(base),
        )
    if device.type != "cpu":
        raise ValueError(f"measure_peak supports cpu and cuda devices, got {device}")
    from torch._guards import active_fake_mode

    tensors = _existing_tensors(existing)
    tracker = _tracker_class()()
    if tensors:
        tracker.track_external(*tensors)
    with tracker:
        fn()
    peaks = tracker.get_tracker_snapshot("peak")
    snap = peaks.get(device, {})
    total = int(snap.get("Total", 0))
    categories = {str(getattr(k, "value", k)): int(v) for k, v in snap.items() if k != "Total"}
    return MemoryReport(
        device=str(device),
        method="memtracker-fake" if active_fake_mode() is not None else "memtracker",
        peak_bytes=total,
        baseline_bytes=_unique_nbytes(tensors),
        by_category=categories,
        peak_host_bytes=int(tracker.peak_host_bytes),
    )
