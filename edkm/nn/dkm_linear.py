"""``DKMLinear``: a Linear layer whose weight goes through DKM soft clustering in forward.

It is the training state of a palettized layer (see :mod:`edkm.nn.palettize` for the whole
lifecycle). Forward, in ``"soft"`` mode, runs DKM (``edkm.dkm.dkm_soft``) from the stored
centroids and, in training mode, stores the new centroids (detached) for the next step: the warm
start. DKM always runs in fp32 arithmetic with autocast disabled (clustering in bf16 would move
the centroids by bf16 rounding steps); the matmul itself follows the ambient autocast.
``"hard"`` mode uses nearest-centroid weights (centroids rounded to fp16, as ``finalize`` does),
so it evaluates exactly the model that ``finalize`` will produce; it passes no gradient to the
weight.

Example:
    >>> import torch
    >>> from edkm.config import DKMConfig
    >>> layer = DKMLinear(nn.Linear(8, 4), DKMConfig(bits=1).global_spec(), "demo")
    >>> layer.centroids.shape, layer(torch.zeros(2, 8)).shape
    (torch.Size([1, 2]), torch.Size([2, 4]))
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from edkm.config import LayerSpec
from edkm.errors import InputError, check_bits
from edkm.nn.palette import lut_lookup

__all__ = ["DKMLinear", "Mode"]

Mode = Literal["soft", "hard"]


def check_finite(weight: torch.Tensor, name: str) -> None:
    from edkm.dkm.unique import is_symbolic

    if is_symbolic(weight):  # FakeTensor / meta: there are no values to check
        return
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise InputError(
            f"layer '{name}': weight has {bad} non-finite value(s) (NaN/inf); "
            "DKM cannot cluster them"
        )


def _group_variance(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    w = weight.detach().float()
    rows = w.reshape(1, -1) if group_size is None else w.reshape(-1, group_size * w.shape[1])
    return rows.var(dim=1, unbiased=False)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointed forwards are recomputed)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class DKMLinear(nn.Module):
    """A Linear layer whose weight goes through DKM soft clustering in forward.

    It holds the original ``weight``/``bias`` Parameters (same objects, same names) plus the
    buffers ``centroids`` (G, K) fp32 and ``tau_base`` (G,) fp32. Build it with ``palettize_``.
    ``centroids``, when given, are the first centroids instead of an initialisation from the
    weight's values (``spec.init``); that is how a layer whose weight has no values (a
    FakeTensor, as the memory ablation measures full-size layers) is built.

    Example:
        >>> layer = DKMLinear(nn.Linear(8, 4), DKMConfig(bits=1).global_spec(), "demo")  # doctest: +SKIP
        >>> layer.centroids.shape  # doctest: +SKIP
        torch.Size([1, 2])
    """

    centroids: torch.Tensor
    tau_base: torch.Tensor

    def __init__(
        self,
        linear: nn.Linear,
        spec: LayerSpec,
        name: str,
        *,
        centroids: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        from edkm.dkm.centroids import init_centroids

        out_features, in_features = linear.weight.shape
        check_bits(spec.bits, f"layer '{name}': bits")
        if spec.group_size is not None and out_features % spec.group_size:
            raise InputError(
                f"layer '{name}': group_size {spec.group_size} does not divide its "
                f"{out_features} output channels"
            )
        check_finite(linear.weight.detach(), name)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.layer_name = name
        self.bits = spec.bits
        self.group_size = spec.group_size
        self.iters = spec.iters
        self.method = spec.method
        self.backend = spec.backend
        self.tau_relative = spec.tau
        self.tau_scale = 1.0
        self.mode: Mode = "soft"
        # centroids the last training forward started from (for checkpoint recomputation)
        self._last_start: torch.Tensor | None = None
        want = (spec.num_groups(out_features), spec.num_centroids)
        if centroids is not None and tuple(centroids.shape) != want:
            raise InputError(
                f"layer '{name}': centroids must have shape {want}, got {tuple(centroids.shape)}"
            )
        with torch.no_grad():
            if centroids is None:
                centroids = init_centroids(
                    self.weight.detach().float(),
                    spec.bits,
                    method=spec.init,
                    group_size=spec.group_size,
                    seed=spec.seed,
                )
            # clamp: a constant group has variance 0, and tau 0 would divide by zero
            var = _group_variance(self.weight, spec.group_size)
            tau_base = spec.tau * var.clamp_min(torch.finfo(torch.float32).tiny)
        self.register_buffer("centroids", centroids.float().to(self.weight.device))
        self.register_buffer("tau_base", tau_base.to(self.weight.device))

    @property
    def num_groups(self) -> int:
        """LUT groups G (1 per tensor, or out_features // group_size)."""
        return 1 if self.group_size is None else self.out_features // self.group_size

    @property
    def tau(self) -> torch.Tensor:
        """The absolute temperature per LUT group that DKM uses now: ``tau_base * tau_scale``."""
        return self.tau_base * self.tau_scale

    def lut(self) -> torch.Tensor:
        """The centroids rounded to fp16, as ``finalize`` and the checkpoint store them."""
        return self.centroids.detach().to(torch.float16)

    def hard_indices(self) -> torch.Tensor:
        """Index of each weight's nearest LUT entry (fp16-rounded centroids), uint8 (out, in)."""
        from edkm.dkm.centroids import hard_assign

        with torch.no_grad():
            return hard_assign(self.weight.detach().float(), self.lut().float(), self.group_size)

    def hard_weight(self) -> torch.Tensor:
        """Nearest-LUT-entry weights in the weight's dtype, exactly what ``finalize`` gives.

        No gradient flows to the weight: hard mode is for evaluation.
        """
        with torch.no_grad():
            lut = self.lut().to(self.weight.dtype)
            return lut_lookup(lut, self.hard_indices(), self.group_size)

    def soft_weight(self) -> torch.Tensor:
        """DKM soft weights; in training mode also stores the new centroids (warm start)."""
        from edkm.dkm.soft import dkm_soft

        # Activation checkpointing re-runs this forward inside backward. The re-run must start
        # from the centroids the original forward started from (not the ones it stored), and
        # must not store again, or its soft weights and gradients would differ. This holds when
        # each forward's backward runs before the layer's next training forward (the usual
        # loop, gradient accumulation included).
        recompute = _in_backward() and self._last_start is not None
        start = self._last_start if recompute else self.centroids
        assert start is not None
        device_type = self.weight.device.type
        # Under autocast the matmul would cast an fp32 soft weight to the autocast dtype (and
        # its gradient back): DKM writes it in that dtype directly, the same values in one pass.
        out_dtype = None
        if torch.is_autocast_enabled(device_type) and self.weight.dtype == torch.float32:
            out_dtype = torch.get_autocast_dtype(device_type)
        try:
            with torch.autocast(device_type=device_type, enabled=False):
                soft, new_centroids = dkm_soft(
                    self.weight,
                    start,
                    tau=self.tau,
                    iters=self.iters,
                    method=self.method,
                    backend=self.backend,
                    group_size=self.group_size,
                    out_dtype=out_dtype,
                )
        except ValueError as err:  # e.g. non-finite weights: say which layer
            raise InputError(f"layer '{self.layer_name}': {err}") from err
        if self.training and not recompute:
            self._last_start = start
            self.centroids = new_centroids.detach().float()
        return soft

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.hard_weight() if self.mode == "hard" else self.soft_weight()
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        group = "per_tensor" if self.group_size is None else f"group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, {group}, iters={self.iters}, "
            f"mode={self.mode}"
        )
