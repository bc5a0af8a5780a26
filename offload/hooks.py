"""Saved-tensor offload hooks: one host copy per storage, views rebuilt on unpack.

:class:`OffloadHooks` is a re-entrant context manager on
``torch.autograd.graph.saved_tensors_hooks``. While it is active, every tensor autograd saves for
backward goes through :meth:`OffloadHooks._pack`:

- tensors on the compute device whose storage is at least ``min_bytes`` are offloaded: their
  whole storage is copied into a new host storage (pinned when the device is CUDA), unless the
  same storage (identity: ``untyped_storage().data_ptr()`` and device, checked against a weak
  reference so a reused address is never mistaken for the old storage, and against the version
  counter so an in-place write forces a fresh copy) was copied already, in which case only the
  view (dtype, size, stride, storage offset) is recorded against the existing copy;
- everything else (small tensors, parameters unless ``offload_parameters``, tensors named in
  :meth:`keep`, sparse/quantized/conjugated layouts, other devices) is kept as is.

On unpack, a host storage is copied back to the device once per backward and shared by all its
views; the device copy is dropped when the last view that is still alive has been unpacked, and
the host copy is freed when the last packed view is freed (so nothing is left behind once the
graph is gone, also after an exception). On CUDA, device-to-host copies run on a side stream
(compute is not blocked) and unpack prefetches the ``prefetch`` storages packed just before the
one it restores (backward usually unpacks in reverse packing order).

On a CPU-only machine the device is the CPU too: the hooks still copy into separate host
storages, so deduplication, view reconstruction and the stats are exercised everywhere; memory
measurement (:mod:`edkm.measure`) is told about each host copy through :func:`host_copy_observers`
so it can file host copies apart from device memory.

Example:
    >>> import torch
    >>> from edkm.offload.hooks import OffloadHooks
    >>> w = torch.randn(256, 256, requires_grad=True)
    >>> with OffloadHooks(min_bytes=0, device="cpu") as off:
    ...     y = w.t().exp()  # exp saves its output; .t() saves nothing
    ...     loss = (y * y.t()).sum()  # mul saves y and y.t(): two views, one storage
    >>> loss.backward()
    >>> off.stats.copies_avoided >= 1, off.stats.host_bytes
    (True, 0)
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["HookStats", "OffloadHooks", "host_copy_observers", "offload_saved_tensors"]

# Callables told about each new host copy (the host tensor), e.g. a memory tracker that files it
# apart from device memory. Module-level so measurement needs no handle on the hooks object.
host_copy_observers: list[Callable[[torch.Tensor], None]] = []
# > 0 while the hooks allocate and fill a host copy, so a tracker can file the new storage as
# host memory from the start (before its first peak update)
allocating_host = [0]


def _fmt(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclasses.dataclass
class HookStats:
    """Counters of :class:`OffloadHooks`. These identities always hold::

        tensors_packed    = tensors_kept + tensors_offloaded
        tensors_offloaded = host_copies + copies_avoided
        bytes_packed      = bytes_kept + bytes_offloaded     (logical bytes of the saved views)
        bytes_moved       = bytes_to_host + bytes_to_device  (storage bytes actually copied)

    ``host_bytes``/``device_bytes`` are the host copies and restored device copies the hooks
    hold now; ``peak_*`` their maxima. ``device_bytes`` counts restored copies only (the rest of
    device memory is the caller's, see :mod:`edkm.measure`).

    Example:
        >>> HookStats().bytes_moved
        0
    """

    tensors_packed: int = 0
    tensors_kept: int = 0
    tensors_offloaded: int = 0
    host_copies: int = 0
    copies_avoided: int = 0
    restores: int = 0
    bytes_packed: int = 0
    bytes_kept: int = 0
    bytes_offloaded: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    host_bytes: int = 0
    peak_host_bytes: int = 0
    device_bytes: int = 0
    peak_device_bytes: int = 0

    @property
    def bytes_moved(self) -> int:
        return self.bytes_to_host + self.bytes_to_device

    def _host(self, delta: int) -> None:
        self.host_bytes += delta
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)

    def _device(self, delta: int) -> None:
        self.device_bytes += delta
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)

    def to_dict(self) -> dict[str, int]:
        out = dataclasses.asdict(self)
        out["bytes_moved"] = self.bytes_moved
        return out

    def __str__(self) -> str:
        return (
            f"packed {self.tensors_packed} tensors ({_fmt(self.bytes_packed)}), "
            f"offloaded {self.tensors_offloaded} ({_fmt(self.bytes_offloaded)}) into "
            f"{self.host_copies} host copies, {self.copies_avoided} copies avoided; moved "
            f"{_fmt(self.bytes_to_host)} to host, {_fmt(self.bytes_to_device)} back "
            f"({self.restores} restores); peak host {_fmt(self.peak_host_bytes)}, "
            f"peak restored on device {_fmt(self.peak_device_bytes)}"
        )


class _Entry:
    """One host copy of one device storage, shared by every packed view of that storage."""

    __slots__ = (
        "__weakref__",
        "device",
        "device_copy",
        "event",
        "host",
        "index",
        "key",
        "live",
        "nbytes",
        "pending",
        "source",
        "src_ref",
        "version",
    )

    def __init__(self, key: tuple[Any, ...], host: torch.Tensor, device: torch.device) -> None:
        self.key = key
        self.host = host  # uint8, whole storage
        self.nbytes = host.numel()
        self.device = device
        self.device_copy: torch.Tensor | None = None  # uint8 on device while being unpacked
        self.event: Any = None  # CUDA event of the last async copy into/out of host
        self.source: Any = None  # device storage kept alive until an async D2H copy is done
        self.src_ref: Any = None  # weak reference to the device storage (address reuse check)
        self.version = 0
        self.live: set[int] = set()  # ids of packed views alive
        self.pending: set[int] = set()  # of those, not yet unpacked in this backward round
        self.index = 0  # order of creation, for prefetching


class _Packed:
    """What autograd stores instead of an offloaded tensor: an entry and a view."""

    __slots__ = ("__weakref__", "dtype", "entry", "offset", "owner", "size", "stride")

    def __init__(self, owner: OffloadHooks, entry: _Entry, t: torch.Tensor) -> None:
        self.owner = owner
        self.entry = entry
        self.dtype = t.dtype
        self.size = tuple(t.shape)
        self.stride = tuple(t.stride())
        self.offset = t.storage_offset()

    def __del__(self) -> None:
        owner = getattr(self, "owner", None)
        if owner is not None:
            owner._release(self)


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    st = t.untyped_storage()
    if isinstance(t, FakeTensor) or t.device.type == "meta":
        # no address to compare: use the identity of the StorageImpl itself
        return (t.device, "impl", st._cdata)
    return (t.device, st.data_ptr())


class OffloadHooks:
    """Move saved tensors to host memory, one copy per storage; see the module docstring.

    Args:
        min_bytes: offload only tensors whose storage has at least this many bytes.
        device: the compute device whose tensors are offloaded ("cuda", "cpu", ...). None:
            "cuda" if CUDA is available when the context is first entered, else "cpu".
        host: where copies go (default "cpu").
        pin_memory: pin host copies (None: when the device is CUDA).
        offload_parameters: also offload leaves that require grad (parameters; they stay
            resident anyway, so offloading them only costs bandwidth; default False).
        prefetch: on unpack, also start restoring this many storages packed just before
            (None: 1 on CUDA, 0 elsewhere: on CPU it would only raise the peak).

    The object may be entered several times, nested or in turn: all entries share one
    deduplication table and one :class:`HookStats` (``.stats``).

    Example:
        >>> x = torch.randn(64, 64, requires_grad=True)
        >>> hooks = OffloadHooks(min_bytes=0, device="cpu")
        >>> with hooks:
        ...     y = x.sigmoid()
        >>> y.sum().backward()
        >>> hooks.stats.host_copies, hooks.stats.bytes_to_host == hooks.stats.bytes_to_device
        (1, True)
    """

    def __init__(
        self,
        *,
        min_bytes: int = 1 << 20,
        device: str | torch.device | None = None,
        host: str | torch.device = "cpu",
        pin_memory: bool | None = None,
        offload_parameters: bool = False,
        prefetch: int | None = None,
    ) -> None:
        if min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {min_bytes}")
        self.min_bytes = int(min_bytes)
        self._device_arg = device
        self.device: torch.device | None = None if device is None else torch.device(device)
        self.host = torch.device(host)
        self._pin_arg = pin_memory
        self.offload_parameters = offload_parameters
        self._prefetch_arg = prefetch
        self.stats = HookStats()
        self._entries: dict[tuple[Any, ...], _Entry] = {}
        self._order: list[weakref.ref[_Entry]] = []
        self._keep: dict[tuple[Any, ...], Any] = {}
        self._contexts: list[Any] = []
        self._stream: Any = None
        self.pin_memory = bool(pin_memory)
        self.prefetch = prefetch or 0
        if device is not None:
            self._resolve()

    # -- configuration resolved on first use (never at import) --------------------------------
    def _resolve(self) -> None:
        if self.device is None:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cuda = self.device.type == "cuda"
        self.pin_memory = cuda if self._pin_arg is None else bool(self._pin_arg)
        self.prefetch = (1 if cuda else 0) if self._prefetch_arg is None else self._prefetch_arg
        if cuda and self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)

    def __enter__(self) -> OffloadHooks:
        self._resolve()
        ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        ctx.__enter__()
        self._contexts.append(ctx)
        return self

    def __exit__(self, *exc: object) -> None:
        self._contexts.pop().__exit__(*exc)

    def attach(self, module: nn.Module) -> list[Any]:
        """Enter the hooks around every forward of ``module``; returns the hook handles.

        Example:
            >>> lin = nn.Linear(8, 8)
            >>> handles = OffloadHooks(min_bytes=0, device="cpu").attach(lin)
            >>> for h in handles:
            ...     h.remove()
        """

        def pre(_m: nn.Module, _args: Any) -> None:
            self.__enter__()

        def post(_m: nn.Module, _args: Any, _out: Any) -> None:
            self.__exit__(None, None, None)

        return [
            module.register_forward_pre_hook(pre),
            module.register_forward_hook(post, always_call=True),
        ]

    def keep(self, *tensors: torch.Tensor) -> None:
        """Never offload these tensors' storages (e.g. a layer input another hook owns)."""
        for t in tensors:
            self._keep[_storage_key(t)] = torch.multiprocessing.reductions.StorageWeakRef(
                t.untyped_storage()
            )

    # -- pack ----------------------------------------------------------------------------------
    def _offloadable(self, t: torch.Tensor) -> bool:
        if t.layout != torch.strided or t.is_quantized or t.is_conj() or t.is_neg():
            return False
        if t.device.type != self.device.type:  # type: ignore[union-attr]
            return False
        if self.device.index is not None and t.device.index != self.device.index:  # type: ignore[union-attr]
            return False
        # autograd hands the hook a plain tensor (often a view, e.g. weight.t()) for a saved
        # Parameter: recognise a leaf requiring grad, or a view of one
        root = t._base if t._base is not None else t
        if not self.offload_parameters and root.is_leaf and root.requires_grad:
            return False
        if t.untyped_storage().nbytes() < max(self.min_bytes, 1):
            return False
        ref = self._keep.get(_storage_key(t))
        return ref is None or ref.expired()

    def _pack(self, t: torch.Tensor) -> Any:
        s = self.stats
        nbytes = t.numel() * t.element_size()
        s.tensors_packed += 1
        s.bytes_packed += nbytes
        if not self._offloadable(t):
            s.tensors_kept += 1
            s.bytes_kept += nbytes
            return t
        s.tensors_offloaded += 1
        s.bytes_offloaded += nbytes
        key = _storage_key(t)
        entry = self._entries.get(key)
        if entry is not None and (entry.src_ref.expired() or entry.version != t._version):
            # the address now belongs to a new storage, or the storage was written in place
            # since it was copied: the old copy stays with its views, this one gets a new copy
            del self._entries[key]
            entry = None
        if entry is None:
            entry = self._copy_to_host(t, key)
            s.host_copies += 1
        else:
            s.copies_avoided += 1
        packed = _Packed(self, entry, t)
        entry.live.add(id(packed))
        entry.pending.add(id(packed))
        return packed

    def _copy_to_host(self, t: torch.Tensor, key: tuple[Any, ...]) -> _Entry:
        st = t.untyped_storage()
        nbytes = st.nbytes()
        # the whole storage as bytes, so any view of it can be rebuilt from the copy
        src = t.detach().as_strided((nbytes // t.element_size(),), (1,), 0).view(torch.uint8)
        allocating_host[0] += 1
        try:
            host = torch.empty(
                nbytes, dtype=torch.uint8, device=self.host, pin_memory=self.pin_memory
            )
        finally:
            allocating_host[0] -= 1
        entry = _Entry(key, host, t.device)
        if self._stream is not None and t.is_cuda:
            # D2H on a side stream once the producer is done: compute goes on meanwhile; the
            # source storage stays referenced until the copy is known to be finished
            self._stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self._stream):
                host.copy_(src, non_blocking=True)
                entry.event = torch.cuda.Event()
                entry.event.record(self._stream)
            entry.source = st
        else:
            host.copy_(src)
        entry.src_ref = torch.multiprocessing.reductions.StorageWeakRef(st)
        entry.version = t._version
        entry.index = len(self._order)
        self._order.append(weakref.ref(entry))
        self._entries[key] = entry
        self.stats.bytes_to_host += nbytes
        self.stats._host(nbytes)
        for observe in host_copy_observers:
            observe(host)
        return entry

    # -- unpack --------------------------------------------------------------------------------
    def _restore(self, entry: _Entry) -> torch.Tensor:
        if entry.device_copy is None:
            if entry.event is not None:
                entry.event.synchronize()  # the D2H copy must be complete before we read it
                entry.event, entry.source = None, None
            if self._stream is not None and entry.device.type == "cuda":
                with torch.cuda.stream(self._stream):
                    dev = entry.host.to(entry.device, non_blocking=True)
                torch.cuda.current_stream(entry.device).wait_stream(self._stream)
                dev.record_stream(torch.cuda.current_stream(entry.device))
            else:
                dev = entry.host.to(entry.device, copy=True)
            entry.device_copy = dev
            self.stats.restores += 1
            self.stats.bytes_to_device += entry.nbytes
            self.stats._device(entry.nbytes)
        return entry.device_copy

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Packed):
            return packed
        entry = packed.entry
        dev = self._restore(entry)
        for i in range(entry.index - 1, max(entry.index - 1 - self.prefetch, -1), -1):
            other = self._order[i]()
            if other is not None and other.live and other.device_copy is None:
                self._restore(other)
        out = dev.view(packed.dtype).as_strided(packed.size, packed.stride, packed.offset)
        entry.pending.discard(id(packed))
        if not entry.pending:
            self._end_round(entry)
        return out

    def _end_round(self, entry: _Entry) -> None:
        # every live view was unpacked: drop the shared device copy (its views keep it alive as
        # long as autograd needs them) and start a new round for a possible next backward
        if entry.device_copy is not None:
            entry.device_copy = None
            self.stats._device(-entry.nbytes)
        entry.pending = set(entry.live)

    def _release(self, packed: _Packed) -> None:
        entry = packed.entry
        entry.live.discard(id(packed))
        entry.pending.discard(id(packed))
        if entry.live:
            if not entry.pending:
                self._end_round(entry)
            return
        if entry.device_copy is not None:
            entry.device_copy = None
            self.stats._device(-entry.nbytes)
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        self.stats._host(-entry.nbytes)
        entry.host = torch.empty(0, dtype=torch.uint8)
        entry.source = None

    def __repr__(self) -> str:
        return (
            f"OffloadHooks(min_bytes={self.min_bytes}, device={self.device}, host={self.host}, "
            f"live host copies={len(self._entries)})"
        )


def offload_saved_tensors(
    modules: Iterable[nn.Module], **kwargs: Any
) -> tuple[OffloadHooks, list[Any]]:
    """Attach one :class:`OffloadHooks` to several modules (e.g. every decoder layer).

    Example:
        >>> hooks, handles = offload_saved_tensors([nn.Linear(4, 4)], min_bytes=0, device="cpu")
        >>> len(handles)
        2
    """
    hooks = OffloadHooks(**kwargs)
    handles: list[Any] = []
    for m in modules:
        handles += hooks.attach(m)
    return hooks, handles
