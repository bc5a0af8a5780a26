"""Marshaling of the DKM layers' saved tensors to host memory (``OffloadConfig``, section ``offload``).

With ``enabled: true``, training runs every DKM layer's forward under the saved-tensor offload
hooks (:class:`edkm.offload.SavedTensorOffload`, eDKM's cross-device marshaling; attached by
:func:`edkm.train.loop.offload_dkm_layers`): what DKM and the layer's matmul save for backward
(attention maps, the soft weight) is copied to host memory once per storage and brought back
once per backward. Gradients are bit-identical with and without it; what it costs is bytes
moved, which the train log reports per step (``offload`` in ``train_log.jsonl``).

Two more offloads are selected here: ``optimizer`` (AdamW state, parameter copies and each
gradient in host memory, :class:`edkm.train.optim_offload.HostOffloadAdamW`) and
``activations`` (every decoder layer's saved tensors, inputs included, through the same
hooks). The other fields are the hooks' knobs (see :class:`~edkm.offload.SavedTensorOffload`).

Example:
    >>> cfg = OffloadConfig(enabled=True, min_bytes=0)
    >>> OffloadConfig.from_yaml_str(cfg.to_yaml()) == cfg
    True
    >>> cfg.hook_kwargs()["min_bytes"]
    0
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edkm.config.base import ConfigBase

__all__ = ["OffloadConfig"]


@dataclasses.dataclass(frozen=True)
class OffloadConfig(ConfigBase):
    """Saved-tensor offload (marshaling) of the DKM layers during training.

    Fields:
        enabled: run the DKM layers' forward under the offload hooks (off by default: on a
            CPU-only machine host and device are the same memory, so it only adds copies).
        min_bytes: storages smaller than this stay on the device (a transfer is not worth it).
        pin_memory: pin the host copies of CUDA tensors (``null``: pin exactly those; pinned
            memory makes the side-stream copies asynchronous).
        prefetch: on CUDA, storages brought back ahead of their use during backward.
        offload_parameters: also offload saved Parameters (off: a weight saved by the matmul
            lives on the device anyway; copying it would free nothing).
        offload_inputs: also offload a DKM layer's input when its matmul saves it (off: the
            input is an activation of the network that a plain Linear saves too, and q/k/v
            share theirs; offloading activations is ``activations``).
        optimizer: keep AdamW's state, a copy of each trained parameter and its gradient in
            host memory; each gradient leaves the device as autograd produces it and the update
            runs on the CPU (:mod:`edkm.train.optim_offload`; the same update as
            ``torch.optim.AdamW``). Not available under sharding (``edkm.shard``).
        activations: run every decoder layer's forward under the offload hooks (its saved
            tensors, its input included, wait in host memory until backward). Independent of
            ``enabled``; with ``train.activation_checkpointing`` it offloads what checkpointing
            keeps (each layer's input).

    Example:
        >>> OffloadConfig().enabled
        False
        >>> OffloadConfig(min_bytes=-1)
        Traceback (most recent call last):
        ...
        edkm.config.base.ConfigError: OffloadConfig.min_bytes: must be >= 0, got -1
    """

    enabled: bool = False
    min_bytes: int = 1 << 20
    pin_memory: bool | None = None
    prefetch: int = 2
    offload_parameters: bool = False
    offload_inputs: bool = False
    optimizer: bool = False
    activations: bool = False

    def validate(self) -> None:
        for name in ("min_bytes", "prefetch"):
            if getattr(self, name) < 0:
                self._fail(name, f"must be >= 0, got {getattr(self, name)}")

    def hook_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`edkm.offload.SavedTensorOffload` for these settings.

        Example:
            >>> sorted(OffloadConfig().hook_kwargs())
            ['min_bytes', 'offload_parameters', 'pin_memory', 'prefetch']
        """
        return {
            "min_bytes": self.min_bytes,
            "pin_memory": self.pin_memory,
            "prefetch": self.prefetch,
            "offload_parameters": self.offload_parameters,
        }
