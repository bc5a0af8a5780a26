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
