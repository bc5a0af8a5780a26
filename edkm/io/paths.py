"""Local paths shared by the model and data loaders: the cache folder, the offline switches, and
the check that turns a user's path into a clear error when it is missing.

edkm never downloads: every model and data set is a local path or ``"default"`` (an asset
shipped inside an installed package). :func:`set_offline_env` makes the Hugging Face libraries
fail at once on anything that would reach the hub; it must run before ``datasets`` is imported,
which reads the switch once at import time.

Example:
    >>> existing_path("no/such/place", "data path")
    Traceback (most recent call last):
    ...
    edkm.errors.InputError: data path 'no/such/place' does not exist
"""

from __future__ import annotations

import os
from pathlib import Path

from edkm.errors import InputError

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def set_offline_env() -> None:
    """Set ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` and ``HF_DATASETS_OFFLINE`` to 1 unless set.

    Example:
        >>> set_offline_env()
        >>> all(os.environ[name] for name in _OFFLINE_VARS)
        True
    """
    for name in _OFFLINE_VARS:
        os.environ.setdefault(name, "1")


def cache_dir() -> Path:
    """The edkm cache folder: ``$EDKM_CACHE_DIR``, else ``$XDG_CACHE_HOME/edkm`` or ``~/.cache/edkm``.

    Example:
        >>> cache_dir().name
        'edkm'
    """
    env = os.environ.get("EDKM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edkm"


def existing_path(spec: str | os.PathLike[str], what: str, hint: str = "") -> Path:
    """``spec`` as a path (``~`` expanded); an ``InputError`` naming ``what`` when it is missing.

    Example:
        >>> existing_path(".", "folder").is_dir()
        True
    """
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"{what} '{spec}' does not exist{hint}")
    return path
