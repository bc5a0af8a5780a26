"""Marks the storages the offloader creates as host memory, for the memory tracker.

On a CPU-only machine the offload hooks' "host" is the CPU too, so a tensor-memory tracker
cannot tell a host copy from a device tensor by its device. The offloader allocates its host
buffers inside :func:`host_allocation`; :func:`edkm.memory.tracker.measure_peak` files every
storage created there in a separate host pool. It lives here, beside the offloader, so that
``edkm.offload`` depends on nothing else in edkm and ``edkm.memory`` reads the flag.

Example:
    >>> with host_allocation():
    ...     in_host_allocation()
    True
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["host_allocation", "in_host_allocation"]

_STATE = threading.local()


@contextlib.contextmanager
def host_allocation() -> Iterator[None]:
    """Storages created inside this block belong to the host pool (offload copies).

    Example:
        >>> with host_allocation():
        ...     in_host_allocation()
        True
    """
    depth = getattr(_STATE, "host_depth", 0)
    _STATE.host_depth = depth + 1
    try:
        yield
    finally:
        _STATE.host_depth = depth


def in_host_allocation() -> bool:
    """True inside :func:`host_allocation` (on this thread).

    Example:
        >>> in_host_allocation()
        False
    """
    return getattr(_STATE, "host_depth", 0) > 0
