"""The DKM palettization config (``DKMConfig``), built on :mod:`edkm.config.base`.

``DKMConfig`` says how to palettize: bits, LUT granularity, the DKM temperature and iterations,
the centroid initialisation, the DKM algorithm (``method``) and kernels (``backend``), and which
layers. By default every Linear layer inside the decoder blocks is palettized (the model adapter
says which those are), never the embeddings or the LM head. Overrides follow coremltools'
scoping: ``module_type_configs`` (by class name) and ``module_name_configs`` (by exact name or
regular expression) map to a ``LayerOverride`` whose set fields replace the global ones, or to
``None`` to skip the layer.

**Temperature.** ``tau`` is relative to the weight spread so that one value means the same
softness in layers of very different scale: for each LUT group (the whole tensor, or one group of
output channels) the absolute temperature that DKM uses is ``tau_abs = tau * var(w_group)``
(population variance of the group's weights at ``palettize_`` time). Since the softmax argument
is ``-(w - c)^2 / tau_abs``, a relative ``tau`` of 0.05 makes the soft assignment switch between
two centroids spaced ``s`` standard deviations apart over about ``0.05 / s`` standard deviations.

Example:
    >>> cfg = DKMConfig(bits=3, module_name_configs={r".*\\.down_proj": {"bits": 4}})
    >>> cfg.module_name_configs[r".*\\.down_proj"].bits
    4
    >>> DKMConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Literal

from edkm.config.base import ConfigBase, ConfigError
from edkm.errors import bits_error

__all__ = ["ConfigBase", "ConfigError", "DKMConfig", "LayerOverride", "LayerSpec"]

# ---------------------------------------------------------------------------------------------
# DKM palettization config
# ---------------------------------------------------------------------------------------------

Granularity = Literal["per_tensor", "per_grouped_channel"]
InitMethod = Literal["kmeans++", "quantile"]
DKMMethod = Literal["auto", "reference", "unique", "implicit"]
DKMBackend = Literal["auto", "torch", "triton"]


def _check_bits(cfg: ConfigBase, bits: int | None) -> None:
    why = None if bits is None else bits_error(bits)
    if why is not None:
        cfg._fail("bits", why)


def _check_tau(cfg: ConfigBase, tau: float | None) -> None:
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        cfg._fail(
            "tau", f"must be a finite number > 0 (relative to the weight variance), got {tau}"
        )


def _check_iters(cfg: ConfigBase, iters: int | None) -> None:
    if iters is not None and iters < 1:
        cfg._fail("iters", f"must be at least 1, got {iters}")


def _check_group_size(cfg: ConfigBase, group_size: int | None) -> None:
    if group_size is not None and group_size < 1:
        cfg._fail("group_size", f"must be at least 1, got {group_size}")


class _DKMSettings(ConfigBase):
    """What ``DKMConfig`` and ``LayerOverride`` share: their DKM settings' checks.

    ``method: triton`` (the word before ``backend`` existed) gets a pointed message, before the
    type check, whose generic "must be one of" would not say what to write.
    """

    # declared by the dataclasses that inherit this (``None``: unset in a ``LayerOverride``)
    bits: int | None
    tau: float | None
    iters: int | None
    group_size: int | None

    def __post_init__(self) -> None:
        if getattr(self, "method", None) == "triton":
            self._fail(
                "method",
                "'triton' is a backend now, not a method: write `backend: triton` (and method "
                "'auto', 'unique' or 'implicit' for the algorithm)",
            )
        super().__post_init__()

    def _check_settings(self) -> None:
        """The checks of bits, tau, iters and group_size (unset ``None`` values pass)."""
        _check_bits(self, self.bits)
        _check_tau(self, self.tau)
        _check_iters(self, self.iters)
        _check_group_size(self, self.group_size)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """The resolved DKM settings of one layer (global config merged with its override)."""

    bits: int
    granularity: Granularity
    group_size: int | None
    tau: float
    iters: int
    init: InitMethod
    method: DKMMethod
    backend: DKMBackend
    seed: int

    @property
    def num_centroids(self) -> int:
        """K = 2**bits centroids per LUT group."""
        return 1 << self.bits

    def num_groups(self, out_features: int) -> int:
        """LUT groups for a layer with ``out_features`` output channels."""
        return 1 if self.group_size is None else out_features // self.group_size


@dataclasses.dataclass(frozen=True)
class LayerOverride(_DKMSettings):
    """Per-layer replacement of some DKM settings; unset (``None``) fields keep the global ones.

    Setting ``granularity="per_tensor"`` drops an inherited ``group_size``.

    Example:
        >>> LayerOverride(bits=4).bits
        4
    """

    bits: int | None = None
    granularity: Granularity | None = None
    group_size: int | None = None
    tau: float | None = None
    iters: int | None = None
    init: InitMethod | None = None
    method: DKMMethod | None = None
    backend: DKMBackend | None = None

    def validate(self) -> None:
        self._check_settings()
        if self.granularity == "per_tensor" and self.group_size is not None:
            self._fail("group_size", "must be unset with granularity='per_tensor'")


@dataclasses.dataclass(frozen=True)
class DKMConfig(_DKMSettings):
    """How to palettize: bits, LUT granularity, DKM temperature/iterations, and which layers.

    Fields:
        bits: index width b in 1..8; each LUT has K = 2**b centroids.
        granularity: ``"per_tensor"`` (one LUT per weight) or ``"per_grouped_channel"`` (one LUT
            per ``group_size`` consecutive output channels; must divide the output channels).
        group_size: output channels per LUT; required with ``per_grouped_channel`` only.
        tau: temperature relative to the weight spread: ``tau_abs = tau * var(w)`` per LUT group
            (see the module docstring). Trainers anneal it with ``set_tau_scale``.
        iters: k-means iterations per forward (backward flows through all of them).
        init: first centroids: ``"kmeans++"`` or ``"quantile"``.
        method: the DKM algorithm (``edkm.dkm.soft``): ``"auto"``, ``"reference"``,
            ``"unique"`` (uniquified) or ``"implicit"`` (implicit attention).
        backend: the kernels of ``"unique"`` / ``"implicit"``: ``"auto"`` (Triton for CUDA
            tensors when triton is installed, else PyTorch ops), ``"torch"`` or ``"triton"``.
        seed: seed of the centroid initialisation.
        module_type_configs: class name -> override (or ``None`` to skip). Applies to default
            targets of that class, or inside a module of that class (e.g. ``"LlamaMLP"``).
        module_name_configs: exact module name or regular expression (full match) -> override
            (or ``None`` to skip). A name override may also select a Linear layer outside the
            decoder blocks (e.g. ``"lm_head"``). Exact names win, then the first matching
            pattern in insertion order; name overrides win over type overrides.

    Example:
        >>> cfg = DKMConfig(bits=2, granularity="per_grouped_channel", group_size=16)
        >>> cfg.global_spec().num_groups(64)
        4
    """

    bits: int = 3
    granularity: Granularity = "per_tensor"
    group_size: int | None = None
    tau: float = 0.05
    iters: int = 3
    init: InitMethod = "kmeans++"
    method: DKMMethod = "auto"
    backend: DKMBackend = "auto"
    seed: int = 0
    module_type_configs: dict[str, LayerOverride | None] = dataclasses.field(default_factory=dict)
    module_name_configs: dict[str, LayerOverride | None] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        self._check_settings()
        if self.granularity == "per_grouped_channel" and self.group_size is None:
            self._fail("group_size", "is required with granularity='per_grouped_channel'")
        if self.granularity == "per_tensor" and self.group_size is not None:
            self._fail("group_size", "needs granularity='per_grouped_channel' (it is per_tensor)")
        for key in self.module_type_configs:
            if not key.isidentifier():
                self._fail("module_type_configs", f"key {key!r} is not a class name")
        for key in self.module_name_configs:
            try:
                re.compile(key)
            except re.error as err:
                self._fail("module_name_configs", f"key {key!r} is not a valid pattern: {err}")
        for field in ("module_type_configs", "module_name_configs"):
            for key, override in getattr(self, field).items():
                if override is not None:
                    self._merge(override, f"{field}[{key!r}]")

    def global_spec(self) -> LayerSpec:
        """The settings of a layer without override.

        Example:
            >>> DKMConfig(bits=4).global_spec().num_centroids
            16
        """
        return LayerSpec(
            bits=self.bits,
            granularity=self.granularity,
            group_size=self.group_size,
            tau=self.tau,
            iters=self.iters,
            init=self.init,
            method=self.method,
            backend=self.backend,
            seed=self.seed,
        )

    def _merge(self, override: LayerOverride, where: str) -> LayerSpec:
        base = self.global_spec()
        granularity = override.granularity or base.granularity
        if override.group_size is not None:
            group_size: int | None = override.group_size
        elif granularity == "per_tensor":
            group_size = None
        else:
            group_size = base.group_size
        if granularity == "per_grouped_channel" and group_size is None:
            self._fail(where, "granularity='per_grouped_channel' needs a group_size")
        if granularity == "per_tensor" and group_size is not None:
            self._fail(where, "group_size needs granularity='per_grouped_channel'")
        return LayerSpec(
            bits=base.bits if override.bits is None else override.bits,
            granularity=granularity,
            group_size=group_size,
            tau=base.tau if override.tau is None else override.tau,
            iters=base.iters if override.iters is None else override.iters,
            init=override.init or base.init,
            method=override.method or base.method,
            backend=override.backend or base.backend,
            seed=base.seed,
        )

    def name_override(self, name: str) -> tuple[bool, str | None]:
        """Which ``module_name_configs`` key applies to ``name``: ``(found, key)``.

        Example:
            >>> DKMConfig(module_name_configs={r".*\\.o_proj": None}).name_override("a.o_proj")
            (True, '.*\\\\.o_proj')
        """
        if name in self.module_name_configs:
            return True, name
        for key in self.module_name_configs:
            if re.fullmatch(key, name):
                return True, key
        return False, None

    def resolve(self, name: str, type_names: Sequence[str], *, default: bool) -> LayerSpec | None:
        """Settings of the module ``name``, or ``None`` when it is not palettized.

        ``type_names`` are the class names of the module, then of its enclosing modules from
        the innermost out; ``default`` says whether the model adapter lists it as a default
        target (a Linear inside a decoder block).

        Example:
            >>> cfg = DKMConfig(bits=3, module_type_configs={"LlamaMLP": {"bits": 4}})
            >>> cfg.resolve("m.mlp.up_proj", ["Linear", "LlamaMLP"], default=True).bits
            4
            >>> cfg.resolve("lm_head", ["Linear"], default=False) is None
            True
        """
        found, key = self.name_override(name)
        if found:
            assert key is not None
            override = self.module_name_configs[key]
            if override is None:
                return None
            return self._merge(override, f"module_name_configs[{key!r}]")
        if not default:
            return None
        for type_name in type_names:
            if type_name in self.module_type_configs:
                type_override = self.module_type_configs[type_name]
                if type_override is None:
                    return None
                return self._merge(type_override, f"module_type_configs[{type_name!r}]")
        return self.global_spec()
