"""``ShardedDKMLinear``: a ``DKMLinear`` that holds only its rank's rows of the weight.

The weight becomes a ``DTensor`` Parameter with placement ``Shard(0)`` on a 1-D device mesh:
the local tensor is this rank's rows (``torch.chunk`` split, as FSDP2 shards its own
parameters), and its global shape is the full weight's. So the optimizer, gradient clipping and
``torch.distributed.checkpoint`` see it exactly like the parameters FSDP2 shards, while its
forward is edkm's (:mod:`edkm.shard.engine`): sharded uniquified DKM on the local rows, then
:class:`~edkm.shard.engine.ShardedLinear` (all-gather for the matmul, only the rows kept for
backward, reduce-scatter of the gradient). The centroids and temperatures stay replicated
buffers, identical on every rank because every rank computes them from the same all-reduced
counts.

Only the uniquified method shards this way (its table is what makes the collectives small):
a layer configured with ``method="reference"`` or ``"implicit"`` is refused.

Example:
    >>> layer = shard_dkm_layer_(dkm_layer, mesh)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edkm.errors import InputError
from edkm.nn.dkm_linear import DKMLinear, _in_backward
from edkm.nn.palette import lut_lookup
from edkm.shard.comm import Comm
from edkm.shard.engine import segments, sharded_linear, sharded_unique_dkm

__all__ = ["ShardedDKMLinear", "local_weight", "shard_dkm_layer_"]


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """The local tensor of a ``DTensor`` (autograd-aware), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return weight.to_local() if isinstance(weight, DTensor) else weight


class ShardedDKMLinear(DKMLinear):
    """A ``DKMLinear`` whose ``weight`` is a ``Shard(0)`` DTensor (module docstring).

    Build it with :func:`shard_dkm_layer_`; the layer's attributes (bits, groups, centroids,
    temperature, mode) are the ``DKMLinear``'s.
    """

    comm: Comm

    @property
    def row_range(self) -> tuple[int, int]:
        """This rank's ``(start, stop)`` rows of the full weight."""
        return self.comm.rows(self.out_features)

    def soft_weight(self) -> torch.Tensor:
        """This rank's rows of the DKM soft weight; stores the new centroids in training mode."""
        recompute = _in_backward() and self._last_start is not None
        start = self._last_start if recompute else self.centroids
        assert start is not None
        rows = local_weight(self.weight)
        device_type = rows.device.type
        out_dtype = None
        if torch.is_autocast_enabled(device_type) and rows.dtype == torch.float32:
            out_dtype = torch.get_autocast_dtype(device_type)
        try:
            with torch.autocast(device_type=device_type, enabled=False):
                soft, new_centroids = sharded_unique_dkm(
                    rows,
                    start,
                    tau=self.tau,
                    iters=self.iters,
                    rows=self.out_features,
                    comm=self.comm,
                    group_size=self.group_size,
                    out_dtype=out_dtype,
                    backend=self.backend,
                )
        except ValueError as err:  # raised on every rank alike (checks on all-reduced counts)
            raise InputError(f"layer '{self.layer_name}': {err}") from err
        if self.training and not recompute:
            self._last_start = start
            self.centroids = new_centroids.detach().float()
        return soft

    def hard_indices(self) -> torch.Tensor:
        """Nearest-LUT-entry index of each local row's weights, uint8 (local rows, in)."""
        from edkm.dkm.centroids import hard_assign

        rows = local_weight(self.weight).detach().float()
        lut = self.lut().float()
        start, stop = self.row_range
        size = self.group_size or self.out_features
        parts = [
            hard_assign(rows[a:b], lut[g0 : g0 + n], None if n == 1 else size)
            for a, b, g0, n in segments(start, stop, size)
        ]
        return (
            torch.cat(parts) if parts else rows.new_empty((0, self.in_features), dtype=torch.uint8)
        )

    def hard_weight(self) -> torch.Tensor:
        """The local rows of the nearest-LUT-entry weight (what ``finalize`` gives)."""
        rows = local_weight(self.weight)
        with torch.no_grad():
            lut = self.lut().to(rows.dtype)
            idx = self.hard_indices()
            start, stop = self.row_range
            size = self.group_size or self.out_features
            parts = [
                lut_lookup(lut[g0 : g0 + n], idx[a:b], None if n == 1 else size)
                for a, b, g0, n in segments(start, stop, size)
            ]
            return torch.cat(parts) if parts else rows.new_empty((0, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.hard_weight() if self.mode == "hard" else self.soft_weight()
        bias = self.bias
        if bias is not None:  # FSDP2 all-gathers it before the block's forward
            bias = bias.full_tensor() if hasattr(bias, "full_tensor") else bias
        return sharded_linear(x, rows, bias, total=self.out_features, comm=self.comm)

    def extra_repr(self) -> str:
        start, stop = self.row_range
        return f"{super().extra_repr()}, rows={start}..{stop} of {self.out_features}"


def shard_dkm_layer_(
    layer: DKMLinear, mesh: Any = None, comm: Comm | None = None
) -> ShardedDKMLinear:
    """Turn ``layer`` into a :class:`ShardedDKMLinear` in place (same object, same buffers).

    Every rank must hold the same full weight (the model loaded the same way on every rank):
    each keeps its ``torch.chunk`` rows, as a new ``Shard(0)`` DTensor Parameter on ``mesh``
    (build the optimizer afterwards, as with FSDP2). Without ``mesh`` the rows are a plain
    Parameter and ``comm`` is required (e.g. ``Comm.counting``, to measure one rank).
    """
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(layer, ShardedDKMLinear):
        return layer
    if layer.method not in ("auto", "unique"):
        raise InputError(
            f"layer '{layer.layer_name}': sharded DKM runs the uniquified method; "
            f"method={layer.method!r} is not sharded (use 'auto' or 'unique')"
        )
    if comm is None:
        if mesh is None:
            raise ValueError("shard_dkm_layer_ needs a mesh or a comm")
        comm = Comm(mesh.get_group())
    full = layer.weight.detach()
    start, stop = comm.rows(full.shape[0])
    local = full[start:stop].clone()  # a copy: the full weight's storage is released
    dt = local
    if mesh is not None:
        dt = DTensor.from_local(
            local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
        )
    requires_grad = layer.weight.requires_grad
    layer.__class__ = ShardedDKMLinear
    assert isinstance(layer, ShardedDKMLinear)
    layer.comm = comm
    layer.weight = nn.Parameter(dt, requires_grad=requires_grad)
    return layer
