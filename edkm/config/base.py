"""The validated, serialisable base of every edkm config (``ConfigBase``) and its error type.

A subclass is a ``@dataclass`` whose fields carry ordinary type annotations; on construction
every field is checked against its annotation (``int``, ``float``, ``bool``, ``str``, ``Path``,
``Literal[...]``, ``X | None``, ``list[X]``, ``tuple[X, ...]``, ``dict[str, X]`` and nested
configs), then ``validate()`` checks the constraints between fields. Errors are ``ConfigError``
(an ``InputError``) with a one-line message that names the key, e.g. ``DKMConfig.bits: must be
an integer in 1..8, got 9``. ``to_dict``/``from_dict`` and ``to_yaml``/``from_yaml`` round-trip
exactly; ``from_dict`` rejects unknown keys.

Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Demo(ConfigBase):
    ...     steps: int = 1
    >>> Demo.from_yaml_str("steps: 3").steps
    3
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn, TypeVar, Union, get_args, get_origin

from edkm.errors import InputError

__all__ = ["ConfigBase", "ConfigError"]


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


# scalar annotation -> (accepted Python types, conversion)
_SCALARS: dict[Any, tuple[tuple[type, ...], Any]] = {
    bool: ((bool,), bool),
    int: ((int,), int),
    float: ((int, float), float),
    str: ((str,), str),
}


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
    if tp in _SCALARS:
        accepted, convert = _SCALARS[tp]
        # bool is an int subclass: True is never accepted as a number
        if isinstance(value, accepted) and (tp is bool or not isinstance(value, bool)):
            return convert(value)
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
        edkm.config.base.ConfigError: Steps.steps: must be at least 1, got 0
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
            >>> from edkm.config import DKMConfig
            >>> DKMConfig.from_dict({"bits": 4, "tua": 0.1})
            Traceback (most recent call last):
            ...
            edkm.config.base.ConfigError: DKMConfig: unknown key 'tua' (known: bits, granularity, group_size, tau, iters, init, method, backend, seed, module_type_configs, module_name_configs)
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
            >>> from edkm.config import DKMConfig
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
            >>> from edkm.config import DKMConfig
            >>> DKMConfig.from_yaml("no/such.yaml")
            Traceback (most recent call last):
            ...
            edkm.config.base.ConfigError: config file 'no/such.yaml' does not exist
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
            >>> from edkm.config import DKMConfig
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
