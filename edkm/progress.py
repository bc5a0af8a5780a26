"""Progress bars for long work (tqdm on stderr), silenced with ``EDKM_NO_PROGRESS=1``.

Example:
    >>> with progress(total=3, desc="demo", disable=True) as bar:
    ...     bar.update(3)
"""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm


def progress(*, total: int | None, desc: str, unit: str = "it", disable: bool = False) -> Any:
    """A tqdm bar; disabled when asked, or when ``EDKM_NO_PROGRESS`` is set."""
    off = disable or os.environ.get("EDKM_NO_PROGRESS", "") not in ("", "0")
    return tqdm(total=total, desc=desc, unit=unit, disable=off, dynamic_ncols=True, leave=False)
