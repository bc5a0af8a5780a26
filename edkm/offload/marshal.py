"""Marshaling: offload the tensors autograd saves for backward to host memory, without duplicates.

:class:`SavedTensorOffload` is a context manager on ``torch.autograd.graph.saved_tensors_hooks``
(eDKM's cross-device marshaling; DESIGN.md section 5):

- **pack**: a saved tensor whose storage is at least ``min_bytes`` is replaced by a record of its
  view (dtype, size, stride, storage offset) against a host copy of its whole storage. The
  storage is copied once, however many views of it are saved: identity is the storage (its data
  pointer and device; the StorageImpl for FakeTensors), never an autograd node's name. A weak
  reference to the source storage, and its version counter, guard the identity: if the storage
  was freed and its address reused, or it was modified in place, the next save makes a new copy.
  The decision is by storage size so that all views of a storage go together and the device
  storage can actually be freed. Parameters (and views of them) stay where they are by default
  (they live on the device anyway; copying them would free nothing), as do tensors in ``keep``.
- **unpack**: the first view unpacked in a backward brings the storage back (one copy); the
  other views share that device copy; the hooks drop their reference when the last view of the
  storage has been unpacked, or when the backward ends, whichever comes first. On a GPU, copies
  run on a side stream, and unpacking one storage prefetches the ``prefetch`` storages saved just
  before it (backward meets them next).
- **stats**: :class:`~edkm.offload.stats.OffloadStats`.

Host copies belong to the packed records, which autograd owns: when the graph is freed (after
backward, or when an exception drops it), so is the host memory. The hooks nest (the innermost
context wins, as for any ``saved_tensors_hooks``), re-enter, and can wrap a module's forward
(:meth:`SavedTensorOffload.attach`: activation offload of whole decoder layers) or just a DKM
call. They run on FakeTensors too (copies are fake), which is how the ablation measures
full-size layers; host buffers are allocated inside :func:`edkm.offload.host.host_allocation` so the
memory helper counts them as host, not device, even when both are the CPU.

Example:
    >>> import torch
    >>> x = torch.randn(256, 256, requires_grad=True)
    >>> with SavedTensorOffload(min_bytes=0) as off:
    ...     y = (x.exp() * x.t()).sum()   # exp's output and x.t() a view of x are saved
    >>> y.backward()
    >>> off.stats.host_copies >= 1
    True
"""

from __future__ import annotations

import bisect
import contextlib
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from edkm.offload.host import host_allocation
from edkm.offload.stats import OffloadStats
from edkm.offload.transfer import CudaTransfer, SyncTransfer, transfer_for

__all__ = ["SavedTensorOffload"]

_Key = tuple[str, str, int]


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(t))


def _storage_key(t: torch.Tensor, fake: bool) -> _Key:
    storage = t.untyped_storage()
    if not fake and t.device.type != "meta":
        ptr = storage.data_ptr()
        if ptr:  # empty storages all have pointer 0
            return (str(t.device), "ptr", ptr)
    return (str(t.device), "impl", storage._cdata)


def _storage_ref(t: torch.Tensor) -> Any:
    # A weak reference to the StorageImpl: it does not keep the memory alive (the allocation is
    # released with the last strong reference) but tells us whether the storage still exists.
    from torch.multiprocessing.reductions import StorageWeakRef

    return StorageWeakRef(t.untyped_storage())


def _fake_context(t: torch.Tensor, fake: bool) -> contextlib.AbstractContextManager[Any]:
    """Allocate fake when ``t`` is fake, even if its FakeTensorMode is not active right now."""
    from torch._guards import active_fake_mode

    if fake and active_fake_mode() is None:
        return t.fake_mode  # type: ignore[attr-defined, no-any-return]
    return contextlib.nullcontext()


def _bytes_of(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    """The whole storage of ``t`` as a flat uint8 tensor (no copy)."""
    # as_strided + view rather than ``Tensor.set_(storage)``: FakeTensorMode's dispatch cache
    # holds on to storages passed to set_, which would keep fake memory "alive" in measurements.
    size = t.element_size()
    if nbytes % size == 0:
        return t.as_strided((nbytes // size,), (1,), 0).view(torch.uint8)
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


def _view_of(buf: torch.Tensor, packed: _Packed) -> torch.Tensor:
    """Rebuild a saved view (dtype, size, stride, offset) on the flat byte buffer ``buf``."""
    size = torch.empty(0, dtype=packed.dtype).element_size()
    if buf.numel() % size == 0:
        return buf.view(packed.dtype).as_strided(packed.size, packed.stride, packed.offset)
    out = torch.empty(0, dtype=packed.dtype, device=buf.device)
    return out.set_(buf.untyped_storage(), packed.offset, packed.size, packed.stride)


class _HostCopy:
    """One storage's bytes on the host, shared by every saved view of it."""

    __slots__ = (
        "__weakref__",
        "device",
        "device_buf",
        "fake",
        "fake_mode",
        "host",
        "nbytes",
        "ready",
        "seq",
        "unpacked",
        "views",
    )

    def __init__(self, host: torch.Tensor, device: torch.device, fake: Any, seq: int) -> None:
        self.host = host
        self.nbytes = host.numel()
        self.device = device
        self.fake = fake is not None
        self.fake_mode = fake
        self.seq = seq
        self.views = 0  # saved views referring to this copy
        self.unpacked = 0  # views unpacked since the device copy was made
        self.device_buf: torch.Tensor | None = None
        self.ready: Any = None


class _Packed:
    """What autograd keeps instead of an offloaded tensor: its view of a host copy."""

    __slots__ = ("copy", "dtype", "offset", "size", "stride")

    def __init__(self, copy: _HostCopy, t: torch.Tensor) -> None:
        self.copy = copy
        self.dtype = t.dtype
        self.size = tuple(t.shape)
        self.stride = t.stride()
        self.offset = t.storage_offset()


class SavedTensorOffload:
    """Offload saved tensors to host memory, one copy per storage (module docstring).

    Args:
        min_bytes: storages smaller than this stay on the device (1 MiB by default: small
            tensors are not worth a transfer).
        host: where copies go (``"cpu"``).
        device: offload only tensors on this device (None: any device, the CPU included, so a
            CPU-only run exercises everything).
        pin_memory: pin host copies of CUDA tensors (None: pin when the source is on CUDA).
        keep: tensors whose storages must stay put (e.g. a layer input saved anyway).
        offload_parameters: also offload ``nn.Parameter`` storages (off: they stay resident).
        prefetch: on CUDA, storages to bring back ahead of use during backward.

    Example:
        >>> layer = torch.nn.Linear(64, 64)
        >>> off = SavedTensorOffload(min_bytes=0)
        >>> handle = off.attach(layer)          # activation offload of the layer's forward
        >>> layer(torch.randn(8, 64, requires_grad=True)).sum().backward()
        >>> handle.remove(); off.stats.tensors_offloaded
        1
    """

    def __init__(
        self,
        *,
        min_bytes: int = 1 << 20,
        host: torch.device | str = "cpu",
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
        keep: Iterable[torch.Tensor] = (),
        offload_parameters: bool = False,
        prefetch: int = 2,
    ) -> None:
        if min_bytes < 0 or prefetch < 0:
            raise ValueError(f"min_bytes and prefetch must be >= 0, got {min_bytes}, {prefetch}")
        self.min_bytes = int(min_bytes)
        self.host = torch.device(host)
        self.device = None if device is None else torch.device(device)
        self.pin_memory = pin_memory
        self.offload_parameters = offload_parameters
        self.prefetch = int(prefetch)
        self.stats = OffloadStats()
        self._copies: dict[_Key, tuple[weakref.ref[_HostCopy], Any, int]] = {}
        self._keep: dict[_Key, Any] = {}
        self._held: dict[int, _HostCopy] = {}  # copies with a device buffer, by id
        self._order: list[weakref.ref[_HostCopy]] = []  # in pack order, for prefetch
        self._engines: dict[torch.device, CudaTransfer] = {}
        self._stack: list[torch.autograd.graph.saved_tensors_hooks] = []
        self._cleanup_task = -1
        self._seq = 0
        self.add_keep(*keep)

    # ---- context ------------------------------------------------------------------------------

    def __enter__(self) -> SavedTensorOffload:
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        hooks.__enter__()
        self._stack.append(hooks)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.pop().__exit__(*exc)

    def attach(self, module: nn.Module, *, keep_inputs: bool = False) -> _AttachHandle:
        """Run ``module``'s forward inside these hooks; ``.remove()`` (or ``with``) undoes it.

        With ``keep_inputs`` the tensors passed to the forward stay on the device when saved
        (:meth:`add_keep`): only what the module itself creates and saves is offloaded (the
        training path of a DKM layer); without it the inputs go too (activation offload of
        whole decoder layers). The exit hook runs even when the forward raises, so the hooks
        never leak.

        Example:
            >>> lin = torch.nn.Linear(256, 256)
            >>> off = SavedTensorOffload(min_bytes=0)
            >>> with off.attach(lin, keep_inputs=True):
            ...     lin(torch.randn(4, 256, requires_grad=True)).sum().backward()
            >>> off.stats.tensors_offloaded, off.stats.tensors_kept   # input kept, weight kept
            (0, 2)
        """

        def enter(_m: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            if keep_inputs:
                inputs = (*args, *kwargs.values())
                self.add_keep(*(a for a in inputs if isinstance(a, torch.Tensor)))
            self.__enter__()

        def leave(_m: nn.Module, _args: Any, _out: Any) -> None:
            self.__exit__(None, None, None)

        pre = module.register_forward_pre_hook(enter, with_kwargs=True)
        post = module.register_forward_hook(leave, always_call=True)
        return _AttachHandle(pre, post)

    def add_keep(self, *tensors: torch.Tensor) -> None:
        """Never offload the storages of ``tensors`` (held weakly: no memory is retained).

        Example:
            >>> off = SavedTensorOffload(); off.add_keep(torch.ones(4))
        """
        for t in tensors:
            self._keep[_storage_key(t, _is_fake(t))] = _storage_ref(t)
        if len(self._keep) > 64:  # drop entries of storages that no longer exist
            self._keep = {k: r for k, r in self._keep.items() if not r.expired()}

    def reset_stats(self) -> None:
        """Zero the counters (the live host and device bytes carry over).

        Example:
            >>> off = SavedTensorOffload(); off.reset_stats(); off.stats.tensors_packed
            0
        """
        live = (self.stats.host_bytes, self.stats.device_bytes)
        self.stats = OffloadStats(host_bytes=live[0], device_bytes=live[1])
        self.stats.peak_host_bytes, self.stats.peak_device_bytes = live

    # ---- pack ---------------------------------------------------------------------------------

    def _offloadable(self, t: torch.Tensor, fake: bool) -> bool:
        if type(t) not in (torch.Tensor, nn.Parameter) and not fake:
            return False  # tensor subclasses (DTensor, ...) are more than their bytes
        if t.layout != torch.strided or t.is_conj() or t.is_neg() or t.is_quantized:
            return False
        if self.device is not None and t.device != self.device:
            return False
        if not self.offload_parameters:
            root = t._base if t._base is not None else t
            if isinstance(t, nn.Parameter) or isinstance(root, nn.Parameter):
                return False
        if t.untyped_storage().nbytes() < self.min_bytes:
            return False
        ref = self._keep.get(_storage_key(t, fake))
        return ref is None or ref.expired()

    def _pack(self, t: torch.Tensor) -> Any:
        stats = self.stats
        view_bytes = t.numel() * t.element_size()
        stats.tensors_packed += 1
        stats.bytes_packed += view_bytes
        fake = _is_fake(t)
        if not self._offloadable(t, fake):
            stats.tensors_kept += 1
            stats.bytes_kept += view_bytes
            return t
        key = _storage_key(t, fake)
        copy = self._lookup(key, t)
        if copy is None:
            copy = self._copy_to_host(t, fake)
            self._copies[key] = (weakref.ref(copy, self._forget(key)), _storage_ref(t), t._version)
            stats.host_copies += 1
        else:
            stats.copies_avoided += 1
        copy.views += 1
        stats.tensors_offloaded += 1
        stats.bytes_offloaded += view_bytes
        return _Packed(copy, t)

    def _lookup(self, key: _Key, t: torch.Tensor) -> _HostCopy | None:
        found = self._copies.get(key)
        if found is None:
            return None
        ref, storage_ref, version = found
        copy = ref()
        if copy is None or storage_ref.expired() or version != t._version:
            return None  # freed and reused address, or modified in place since the copy
        return copy

    def _forget(self, key: _Key) -> Any:
        def callback(dead: weakref.ref[_HostCopy]) -> None:
            found = self._copies.get(key)
            if found is not None and found[0] is dead:
                del self._copies[key]

        return callback

    def _copy_to_host(self, t: torch.Tensor, fake: bool) -> _HostCopy:
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        engine = transfer_for(t.device, self._engines, fake=fake)
        pin = self.pin_memory if self.pin_memory is not None else t.device.type == "cuda"
        pin = pin and not fake and self.host.type == "cpu"
        with torch.no_grad(), _fake_context(t, fake):
            src = _bytes_of(t, nbytes)
            with host_allocation():
                host = engine.alloc_host(nbytes, pin=pin, host=self.host)
                engine.to_host(src, host)
        self._seq += 1
        copy = _HostCopy(host, t.device, t.fake_mode if fake else None, self._seq)  # type: ignore[attr-defined]
        self.stats.bytes_to_host += nbytes
        self.stats.add_host(nbytes)
        weakref.finalize(copy, _host_freed, weakref.ref(self), nbytes)
        if isinstance(engine, CudaTransfer) and self.prefetch:
            self._order.append(weakref.ref(copy))
        return copy

    # ---- unpack -------------------------------------------------------------------------------

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        copy = packed.copy
        engine = transfer_for(copy.device, self._engines, fake=copy.fake)
        buf = self._restore(copy, engine)
        if isinstance(engine, CudaTransfer):
            self._prefetch_before(copy, engine)
        engine.wait(copy.ready)
        ctx = copy.fake_mode if copy.fake and _no_fake_mode() else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            out = _view_of(buf, packed)
        copy.unpacked += 1
        if copy.unpacked >= copy.views:  # every view has its tensor: the hooks let go
            self._drop(copy, engine)
        return out

    def _restore(self, copy: _HostCopy, engine: SyncTransfer) -> torch.Tensor:
        if copy.device_buf is not None:
            return copy.device_buf
        ctx = copy.fake_mode if copy.fake and _no_fake_mode() else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            buf, ready = engine.to_device(copy.host, copy.device)
        copy.device_buf, copy.ready = buf, ready
        copy.unpacked = 0
        self._held[id(copy)] = copy
        self.stats.restores += 1
        self.stats.bytes_to_device += copy.nbytes
        self.stats.add_device(copy.nbytes)
        self._cleanup_after_backward()
        return buf

    def _prefetch_before(self, copy: _HostCopy, engine: SyncTransfer) -> None:
        # backward meets storages in reverse save order: bring back the ones saved just before
        self._order = [r for r in self._order if r() is not None]
        seqs = [r().seq for r in self._order]  # type: ignore[union-attr]
        i = bisect.bisect_left(seqs, copy.seq)
        for ref in self._order[max(0, i - self.prefetch) : i]:
            other = ref()
            if other is not None and other.device_buf is None:
                self._restore(other, engine)

    def _drop(self, copy: _HostCopy, engine: SyncTransfer) -> None:
        if copy.device_buf is None:
            return
        engine.release(copy.device_buf, copy.ready)
        copy.device_buf, copy.ready = None, None
        copy.unpacked = 0
        self._held.pop(id(copy), None)
        self.stats.device_bytes -= copy.nbytes

    def _cleanup_after_backward(self) -> None:
        """At the end of the running backward, drop device copies not every view asked for."""
        task = torch._C._current_graph_task_id()
        if task == -1 or task == self._cleanup_task:
            return  # not inside a backward (e.g. a saved tensor read by hand), or queued already
        self._cleanup_task = task

        def end_of_backward() -> None:
            self._cleanup_task = -1
            for copy in list(self._held.values()):
                self._drop(copy, transfer_for(copy.device, self._engines, fake=copy.fake))

        torch.autograd.Variable._execution_engine.queue_callback(end_of_backward)  # type: ignore[attr-defined]


def _no_fake_mode() -> bool:
    from torch._guards import active_fake_mode

    return active_fake_mode() is None


def _host_freed(owner: weakref.ref[SavedTensorOffload], nbytes: int) -> None:
    offload = owner()
    if offload is not None:
        offload.stats.host_bytes -= nbytes


class _AttachHandle:
    """Removes the forward hooks that :meth:`SavedTensorOffload.attach` registered."""

    def __init__(self, *handles: Any) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> _AttachHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
