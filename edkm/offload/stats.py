"""Counters of the saved-tensor offload hooks, printable and serialisable.

Every saved tensor the hooks see is either kept on its device or offloaded; an offloaded tensor
either makes a new host copy of its storage or reuses the copy another view of the same storage
already made (a copy avoided). So, at any time::

    tensors_packed   = tensors_kept + tensors_offloaded
    tensors_offloaded = host_copies + copies_avoided
    bytes_packed     = bytes_kept + bytes_offloaded          (logical bytes of the saved views)

``bytes_to_host`` is the storage bytes copied to the host (one copy per storage however many
views), ``bytes_to_device`` the storage bytes brought back (once per storage per backward).

Example:
    >>> s = OffloadStats()
    >>> s.tensors_packed, s.bytes_moved
    (0, 0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["OffloadStats"]


def _fmt(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@dataclasses.dataclass
class OffloadStats:
    """What the offload hooks did (see the module docstring for the identities that hold).

    Attributes:
        tensors_packed: saved tensors the pack hook received.
        tensors_kept: of those, left where they were (below the size threshold, parameters,
            the ``keep`` set, another device, or a layout that cannot be rebuilt from bytes).
        tensors_offloaded: of those, replaced by a host copy (new or shared).
        host_copies: storages copied to the host.
        copies_avoided: offloaded views whose storage already had a host copy.
        bytes_packed / bytes_kept / bytes_offloaded: logical bytes (numel x element size) of
            the saved tensors in each class.
        bytes_to_host: storage bytes copied to the host.
        bytes_to_device: storage bytes copied back to the device on unpack.
        restores: storages brought back (each at most once per backward).
        host_bytes / peak_host_bytes: host copies alive now / at most.
        device_bytes / peak_device_bytes: restored device copies the hooks hold now / at most
            (a storage is held from its first unpack until its last view is unpacked or the
            backward ends).
    """

    tensors_packed: int = 0
    tensors_kept: int = 0
    tensors_offloaded: int = 0
    host_copies: int = 0
    copies_avoided: int = 0
    bytes_packed: int = 0
    bytes_kept: int = 0
    bytes_offloaded: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    restores: int = 0
    host_bytes: int = 0
    peak_host_bytes: int = 0
    device_bytes: int = 0
    peak_device_bytes: int = 0

    @property
    def bytes_moved(self) -> int:
        """Bytes copied in both directions."""
        return self.bytes_to_host + self.bytes_to_device

    def add_host(self, nbytes: int) -> None:
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)

    def add_device(self, nbytes: int) -> None:
        self.device_bytes += nbytes
        self.peak_device_bytes = max(self.peak_device_bytes, self.device_bytes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["bytes_moved"] = self.bytes_moved
        return out

    def __str__(self) -> str:
        rows = [
            ("saved tensors", f"{self.tensors_packed} ({self.tensors_kept} kept on device)"),
            ("offloaded", f"{self.tensors_offloaded} views, {_fmt(self.bytes_offloaded)}"),
            ("host copies", f"{self.host_copies} storages, {_fmt(self.bytes_to_host)} moved"),
            ("copies avoided", str(self.copies_avoided)),
            ("restored", f"{self.restores} storages, {_fmt(self.bytes_to_device)} moved"),
            ("host now / peak", f"{_fmt(self.host_bytes)} / {_fmt(self.peak_host_bytes)}"),
            ("device now / peak", f"{_fmt(self.device_bytes)} / {_fmt(self.peak_device_bytes)}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
