"""Configuration dataclasses: a validated, serialisable base and the DKM palettization config.

``ConfigBase`` is the small machinery every edkm config is built on (DKM here; training, offload,
sharding and export elsewhere). A subclass is a ``@dataclass`` whose fields carry ordinary type
annotations; on construction every field is checked against its annotation (``int``, ``float``,
``bool``, ``str``, ``Path``, ``Literal[...]``, ``X | None``, ``list[X]``, ``tuple[X, ...]``,
``dict[str, X]`` and nested configs), then ``validate()`` checks the constraints between fields.
Errors are ``ConfigError`` (an ``InputError``) with a one-line message that names the key, e.g.
``DKMConfig.bits: must be an integer in 1..8, got 9``. ``to_dict``/``from_dict`` and
``to_yaml``/``from_yaml`` round-trip exactly; ``from_dict`` rejects unknown keys.

``DKMConfig`` says how to palettize: bits, LUT granularity, the DKM temperature and iterations,
the centroid initialisation, the DKM implementation, and which layers. By default every Linear
layer inside the decoder blocks is palettized (the model adapter says which those are), never
the embeddings or the LM head. Overrides follow coremltools' scoping: ``module_type_configs``
(by class name) and ``module_name_configs`` (by exact name or regular expression) map to a
``LayerOverride`` whose set fields replace the global ones, or to ``None`` to skip the layer.

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
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn, TypeVar, Union, get_args, get_origin

from edkm.errors import InputError

__all__ = [
    "ConfigBase",
    "ConfigError",
    "DKMConfig",
    "LayerOverride",
    "LayerSpec",
]


class ConfigError(InputError):
    """A configuration value is wrong; the message names the key (``Class.field: why``)."""


_C = TypeVar("_C", bound="ConfigBase")
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves the string annotations that ``from __future__ import annotations``
    # leaves behind; cached because it walks the MRO every call.
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _mismatch(path: str, tp: Any, value: Any) -> NoReturn:
    raise ConfigError(
        f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {_short(value)}"
    )


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it, converted where lossless.

    Conversions: int -> float, str -> Path, list -> tuple, dict -> nested config. ``bool`` is
    never accepted as a number (``True`` is an ``int`` in Python, but never what a user meant).
    """
    if tp is Any or tp is object:
        return value
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if type(value) is type(choice) and value == choice:
                return value
        raise ConfigError(
            f"{path}: must be one of {', '.join(repr(c) for c in choices)}, got {_short(value)}"
        )
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _mismatch(path, tp, value)
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: let X's own (possibly nested) message through
            return _coerce(value, options[0], path)
        for option in options:
            try:
                return _coerce(value, option, path)
            except ConfigError:
                continue
        _mismatch(path, tp, value)
    if tp is type(None):
        if value is None:
            return None
        _mismatch(path, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        _mismatch(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _mismatch(path, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _mismatch(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        _mismatch(path, tp, value)
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        _mismatch(path, tp, value)
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return tp._from_dict(value, path)
        _mismatch(path, tp, value)
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            _mismatch(path, tp, value)
        (item,) = get_args(tp) or (Any,)
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            _mismatch(path, tp, value)
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            _mismatch(path, tp, value)
        key_tp, value_tp = get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, f"{path} key"): _coerce(v, value_tp, f"{path}[{k!r}]")
            for k, v in value.items()
        }
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        _mismatch(path, tp, value)
    return value  # an annotation this checker does not understand: accept as given


def _plain(value: Any) -> Any:
    """Turn a field value into plain JSON/YAML data (lists, dicts, str, numbers, None)."""
    if isinstance(value, ConfigBase):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


class ConfigBase:
    """Base of edkm's config dataclasses: typed fields checked on construction, ``validate()``
    for constraints between fields, exact ``to_dict``/``from_dict`` and YAML round trips.

    Subclasses are ``@dataclasses.dataclass`` (frozen or not) and override ``validate`` using
    ``self._fail(field, why)`` for errors.

    Example:
        >>> @dataclasses.dataclass
        ... class Steps(ConfigBase):
        ...     steps: int = 10
        ...     def validate(self) -> None:
        ...         if self.steps < 1:
        ...             self._fail("steps", f"must be at least 1, got {self.steps}")
        >>> Steps.from_dict({"steps": 0})
        Traceback (most recent call last):
        ...
        edkm.config.ConfigError: Steps.steps: must be at least 1, got 0
    """

    # Subclasses are dataclasses; this lets mypy see ``dataclasses.fields(self)`` as valid.
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        name = type(self).__name__
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            checked = _coerce(value, hints[field.name], f"{name}.{field.name}")
            if checked is not value:
                # object.__setattr__ also works on frozen dataclasses
                object.__setattr__(self, field.name, checked)
        self.validate()

    def validate(self) -> None:
        """Check constraints between fields; raise with ``self._fail``. Runs on construction."""

    def _fail(self, field: str, why: str) -> NoReturn:
        raise ConfigError(f"{type(self).__name__}.{field}: {why}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, str, numbers, None), ready for JSON or YAML."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[_C], data: Mapping[str, Any]) -> _C:
        """Build from plain data; unknown keys and wrong types are errors naming the key.

        Example:
            >>> DKMConfig.from_dict({"bits": 4, "tua": 0.1})
            Traceback (most recent call last):
            ...
            edkm.config.ConfigError: DKMConfig: unknown key 'tua' (known: bits, granularity, group_size, tau, iters, init, method, seed, module_type_configs, module_name_configs)
        """
        return cls._from_dict(data, cls.__name__)

    @classmethod
    def _from_dict(cls: type[_C], data: Mapping[str, Any], path: str) -> _C:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in data:
            if key not in fields:
                known = ", ".join(fields)
                raise ConfigError(f"{path}: unknown key {key!r} (known: {known})")
        for name, field in fields.items():
            no_default = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            if field.init and no_default and name not in data:
                raise ConfigError(f"{path}: missing required key {name!r}")
        try:
            return cls(**data)
        except ConfigError as err:
            # re-root messages of nested configs at the outer path, e.g. DKMConfig.x['k'].bits
            text = str(err)
            prefix = cls.__name__
            if path != prefix and text.startswith(prefix):
                raise ConfigError(path + text[len(prefix) :]) from None
            raise

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """Return the config as YAML text, and write it to ``path`` when given.

        Example:
            >>> print(DKMConfig(bits=2).to_yaml().splitlines()[0])
            bits: 2
        """
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls: type[_C], path: str | os.PathLike[str]) -> _C:
        """Read a YAML file holding one mapping; errors name the file and the key.

        Example:
            >>> DKMConfig.from_yaml("no/such.yaml")
            Traceback (most recent call last):
            ...
            edkm.config.ConfigError: config file 'no/such.yaml' does not exist
        """
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            return cls.from_yaml_str(file.read_text())
        except ConfigError as err:
            raise ConfigError(f"config file '{path}': {err}") from None

    @classmethod
    def from_yaml_str(cls: type[_C], text: str) -> _C:
        """Parse YAML text holding one mapping (an empty document gives the defaults).

        Example:
            >>> DKMConfig.from_yaml_str("bits: 4\\ntau: 0.1").bits
            4
        """
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "invalid YAML"
            raise ConfigError(f"invalid YAML: {first}") from None
        if data is None:
            data = {}
        return cls.from_dict(data)


# ---------------------------------------------------------------------------------------------
# DKM palettization config
# ---------------------------------------------------------------------------------------------

Granularity = Literal["per_tensor", "per_grouped_channel"]
InitMethod = Literal["kmeans++", "quantile"]
DKMMethod = Literal["auto", "reference", "unique", "triton"]

MAX_BITS = 8  # indices are stored as uint8


def _check_bits(cfg: ConfigBase, bits: int | None) -> None:
    if bits is not None and not 1 <= bits <= MAX_BITS:
        cfg._fail("bits", f"must be an integer in 1..{MAX_BITS}, got {bits}")


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
    seed: int

    @property
    def num_centroids(self) -> int:
        """K = 2**bits centroids per LUT group."""
        return 1 << self.bits

    def num_groups(self, out_features: int) -> int:
        """LUT groups for a layer with ``out_features`` output channels."""
        return 1 if self.group_size is None else out_features // self.group_size


@dataclasses.dataclass(frozen=True)
class LayerOverride(ConfigBase):
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

    def validate(self) -> None:
        _check_bits(self, self.bits)
        _check_tau(self, self.tau)
        _check_iters(self, self.iters)
        _check_group_size(self, self.group_size)
        if self.granularity == "per_tensor" and self.group_size is not None:
            self._fail("group_size", "must be unset with granularity='per_tensor'")


@dataclasses.dataclass(frozen=True)
class DKMConfig(ConfigBase):
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
        method: DKM implementation: ``"auto"``, ``"reference"``, ``"unique"``, ``"triton"``.
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
    seed: int = 0
    module_type_configs: dict[str, LayerOverride | None] = dataclasses.field(default_factory=dict)
    module_name_configs: dict[str, LayerOverride | None] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        _check_bits(self, self.bits)
        _check_tau(self, self.tau)
        _check_iters(self, self.iters)
        _check_group_size(self, self.group_size)
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
