"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os


def write_atomically(path: str, data: bytes | str) -> None:
    """Writes `path` through a temporary file beside it, synced, then renamed into place.

    A crash leaves either the previous file or the new one, never a partly written one; the
    temporary file is removed if writing it fails.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
