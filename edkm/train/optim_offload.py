"""AdamW with its state in host memory: ``HostOffloadAdamW`` (recipe key ``offload.optimizer``).

What stays on the device: the parameters only. What lives in host memory (pinned when the
device is a GPU): a copy of every trained parameter, its gradient, and AdamW's two moments.

- Each gradient goes to the host as soon as autograd has accumulated it
  (``Tensor.register_post_accumulate_grad_hook``) and the device gradient is freed at once, so
  the device never holds all gradients together: during backward only the gradients of the
  layer being differentiated exist there. With gradient accumulation the host copy
  accumulates (the same in-place add autograd does on the device, in the parameter's dtype).
- ``step()`` runs ``torch.optim.AdamW`` on the host copies (torch's per-tensor
  vectorised kernels by default, ``foreach=True`` or torch's fused CPU kernel with ``fused=True``), then copies each updated
  parameter back to the device (asynchronously from pinned memory on a GPU).
- ``clip_grad_norm_`` clips the host gradients (``torch.nn.utils.clip_grad_norm_``).
- ``state_dict()``/``load_state_dict()`` are the inner ``AdamW``'s (same layout as a plain
  AdamW over these parameters, the state tensors on the host), so checkpoint/resume is exact.

The update is torch's own AdamW on tensors of the same dtype and values, so on a CPU the
parameters after N steps are bit-identical to ``torch.optim.AdamW`` over the same parameters
with the same ``foreach``/``fused`` choice (``tests/train/test_optim_offload.py``).

Written by hand because: torch has no optimizer-state offload for a single device
(``torch.distributed.fsdp`` offloads under sharding only, DeepSpeed's ZeRO-Offload is a whole
engine), and what is needed is small: the hooks, the host copies, and a wrapper that makes the
host AdamW look like an optimizer of the device parameters to the LR scheduler and the
checkpoint code. Under sharding (``edkm.shard``) it is refused; FSDP2 has its own
``CPUOffloadPolicy``.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(4))
    >>> opt = HostOffloadAdamW([w], lr=0.1, weight_decay=0.0)
    >>> (w * 2).sum().backward()
    >>> w.grad is None, opt.host_params[0].grad.tolist()
    (True, [2.0, 2.0, 2.0, 2.0])
    >>> opt.step(); opt.zero_grad()
    >>> [round(v, 4) for v in w.tolist()]
    [0.9, 0.9, 0.9, 0.9]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from edkm.offload.host import host_allocation

__all__ = ["HostOffloadAdamW"]


class HostOffloadAdamW(torch.optim.Optimizer):
    """AdamW whose gradients, moments and parameter copies live in host memory (module doc).

    Args:
        params: the device parameters to train (one group).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        foreach, fused: the host AdamW's implementation (``torch.optim.AdamW``'s flags;
            ``None`` is torch's own choice for CPU tensors, so the update is bit-identical to
            a plain ``AdamW`` trained on the CPU; ``fused=True`` is torch's fused CPU kernel).
        pin_memory: pin the host copies (``None``: when any parameter is on a GPU).

    Example:
        >>> opt = HostOffloadAdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        >>> opt.host_params[0].device
        device(type='cpu')
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        foreach: bool | None = None,
        fused: bool | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        device_params = list(params)
        if not device_params:
            raise ValueError("HostOffloadAdamW: no parameters to optimise")
        if pin_memory is None:
            pin_memory = any(p.device.type == "cuda" for p in device_params)
        self._pin = bool(pin_memory)
        self._async = any(p.device.type == "cuda" for p in device_params)
        with host_allocation():  # the memory tracker files these under the host pool
            host = [self._host_copy(p) for p in device_params]
        self.inner = torch.optim.AdamW(
            host,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            fused=fused,
        )
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(device_params, defaults)
        self.host_params = host
        self._handles = [
            p.register_post_accumulate_grad_hook(self._grad_hook(i))
            for i, p in enumerate(device_params)
        ]

    # -- host copies -------------------------------------------------------------------------

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self._pin)
        out.copy_(t.detach())
        return out.requires_grad_(t.requires_grad)

    def _grad_hook(self, index: int) -> Any:
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad is None:
                return
            host = self.host_params[index]
            with torch.no_grad(), host_allocation():
                if host.grad is None:
                    buf = torch.empty(
                        grad.shape, dtype=grad.dtype, device="cpu", pin_memory=self._pin
                    )
                    buf.copy_(grad, non_blocking=self._async)
                    host.grad = buf
                else:
                    self._sync()  # the previous copy into host.grad must have landed
                    host.grad.add_(grad.to("cpu"))
            param.grad = None  # freed on the device as soon as it is on the host

        return hook

    def _sync(self) -> None:
        if self._async:
            torch.cuda.current_stream().synchronize()

    # -- the optimizer interface -------------------------------------------------------------

    def _push_hyperparameters(self) -> None:
        # the LR scheduler writes the device-side groups; the host AdamW reads its own
        for mine, theirs in zip(self.param_groups, self.inner.param_groups):
            for key, value in mine.items():
                if key != "params":
                    theirs[key] = value

    def _pull_hyperparameters(self) -> None:
        for mine, theirs in zip(self.param_groups, self.inner.param_groups):
            for key, value in theirs.items():
                if key != "params":
                    mine[key] = value

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One AdamW step on the host copies, then the new values copied to the device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync()
        self._push_hyperparameters()
        with host_allocation():
            self.inner.step()
        for group in self.param_groups:
            for p, host in zip(group["params"], self.host_params):
                p.copy_(host, non_blocking=self._async)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the host gradients; no gradient stays on the device anyway."""
        self.inner.zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the host gradients to a global L2 norm of ``max_norm``; returns the norm before.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(4))
            >>> opt = HostOffloadAdamW([w])
            >>> (w * 3).sum().backward()
            >>> float(opt.clip_grad_norm_(1.0))
            6.0
        """
        self._sync()
        grads = [p for p in self.host_params if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(grads, max_norm)

    def state_dict(self) -> dict[str, Any]:
        self._push_hyperparameters()
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        with host_allocation():
            self.inner.load_state_dict(state_dict)
        self._pull_hyperparameters()
        # the host copies follow the device parameters (the model checkpoint restored them)
        with torch.no_grad():
            for group in self.param_groups:
                for p, host in zip(group["params"], self.host_params):
                    host.copy_(p.detach())

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the optimizer stops receiving gradients)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
