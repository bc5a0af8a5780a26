"""Errors that mean "the user's input is wrong" rather than "edkm has a bug".

The command line prints these as one line and exits with status 2; the Python API raises them
as ordinary exceptions (they subclass ``ValueError`` so callers can catch them generically).

Example:
    >>> from edkm.errors import InputError
    >>> try:
    ...     raise InputError("--seq-len must be at least 2, got 0")
    ... except ValueError as err:
    ...     print(err)
    --seq-len must be at least 2, got 0
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a missing file, a folder that is not a model, an invalid option."""


MAX_BITS = 8  # LUT indices are stored as uint8: at most 2**8 entries


def bits_error(bits: object) -> str | None:
    """Why ``bits`` is not a valid index width (an int in 1..8), or None when it is.

    Example:
        >>> bits_error(3) is None, bits_error(9)
        (True, 'must be an integer in 1..8, got 9')
    """
    if isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= MAX_BITS:
        return None
    return f"must be an integer in 1..{MAX_BITS}, got {bits!r}"


def check_bits(bits: object, name: str = "bits") -> int:
    """``bits`` when it is an int in 1..8, else ``InputError`` naming ``name``: the one check
    every stage (config, layers, bit-packing, baselines, command line) uses.

    Example:
        >>> check_bits(4)
        4
        >>> check_bits(0, "--bits")
        Traceback (most recent call last):
        ...
        edkm.errors.InputError: --bits must be an integer in 1..8, got 0
    """
    why = bits_error(bits)
    if why is not None:
        raise InputError(f"{name} {why}")
    assert isinstance(bits, int)
    return bits


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for the
    one-line errors that wrap a library's multi-line message.

    Example:
        >>> first_line(ValueError("bad file\\nmore detail")), first_line(KeyError())
        ('bad file', 'KeyError')
    """
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
